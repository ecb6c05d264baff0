// AMX and AVX512-BF16 2:4 matmuls for bfloat16 on the shared panel driver (common/amx_bf16.h).
// The tile unit has no use for the zeros a 2:4 weight skips, so each panel is
// expanded to dense 16 x 32 blocks (one per metadata word, every step a K = 32 product). From
// batch 8 the bfloat16 2:4 vector kernels lose to torch's dense AMX product (0.4-0.6x at batch 8
// and 16, 0.2-0.3x at 128); the expanded product does the dense work from half the weight bytes
// and measured 0.8-1.2x dense (bench/NOTES.md, stop 21).
#include "common/amx_bf16.h"
#include "sparse24/sparse24_matmul.h"

namespace pyhwp {

namespace {

// The expansion masks of 16 metadata words: bit 4g + q of word c's mask is set where one of
// group g's two slots sits at position q (the slots' 2-bit positions, one-hot in their nibble).
inline __m512i expand_masks(__m512i meta) {
  const __m512i ones = _mm512_set1_epi32(0x11111111);
  auto one_hot = [&](__m512i v) {  // v: a 2-bit position at bits 0-1 of every nibble
    const __m512i x0 = _mm512_and_si512(v, ones), x1 = _mm512_and_si512(_mm512_srli_epi32(v, 1), ones);
    const __m512i n0 = _mm512_andnot_si512(x0, ones), n1 = _mm512_andnot_si512(x1, ones);
    return _mm512_or_si512(
        _mm512_or_si512(_mm512_and_si512(n1, n0), _mm512_slli_epi32(_mm512_and_si512(n1, x0), 1)),
        _mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(x1, n0), 2), _mm512_slli_epi32(_mm512_and_si512(x1, x0), 3)));
  };
  const __m512i pos = _mm512_set1_epi32(0x33333333);
  return _mm512_or_si512(one_hot(_mm512_and_si512(meta, pos)),
                         one_hot(_mm512_and_si512(_mm512_srli_epi32(meta, 2), pos)));
}

struct Sparse24Panels {
  const Sparse24MatrixBf16& w;
  int64_t words;  // metadata words per row, Kp / 32

  void runs(int nt, std::vector<int64_t>* r) const {  // every panel has the same work
    const int64_t npanels = (w.rows + 15) / 16;
    r->resize(static_cast<size_t>(nt + 1));
    for (int i = 0; i <= nt; ++i) (*r)[static_cast<size_t>(i)] = npanels * i / nt;
  }

  int64_t capacity(int64_t, int64_t) const { return words * 2 * amx::kTile; }

  // Word c of the panel's rows, expanded (VPEXPANDW: the 16 slots to their positions, zeros
  // elsewhere) and transposed as pairs: B of k-tiles 2c and 2c + 1.
  int64_t prepare(int64_t j, uint16_t* b, amx::Step* steps) const {
    const int64_t kp2 = words * 16;  // slots per row
    const int rows_here = static_cast<int>(std::min<int64_t>(16, w.rows - 16 * j));
    uint32_t* masks = reinterpret_cast<uint32_t*>(scratch(3, 16 * words + 16));
    for (int r = 0; r < rows_here; ++r) {
      const uint32_t* meta = w.meta + (16 * j + r) * words;
      for (int64_t c = 0; c < words; c += 16) {
        const __mmask16 m = avx512::tail_mask(words - c);
        _mm512_mask_storeu_epi32(masks + r * words + c, m, expand_masks(_mm512_maskz_loadu_epi32(m, meta + c)));
      }
    }
    const int64_t kt = (w.cols + 15) / 16;
    for (int64_t c = 0; c < words; ++c) {
      __m512 m[16];
      for (int r = 0; r < 16; ++r) {
        m[r] = r < rows_here ? _mm512_castsi512_ps(_mm512_maskz_expandloadu_epi16(
                                   masks[r * words + c], w.values + (16 * j + r) * kp2 + 16 * c))
                             : _mm512_setzero_ps();
      }
      avx512::transpose16(m);  // m[i], lane n: row n's inputs 32c + 2i, 32c + 2i + 1
      for (int i = 0; i < 16; ++i) _mm512_store_ps(reinterpret_cast<float*>(b + 2 * amx::kTile * c + 32 * i), m[i]);
      // A last odd k-tile has no partner in X: a single step on the first half.
      steps[c] = {static_cast<int32_t>(2 * c), 2 * c + 1 < kt};
    }
    return words;
  }

  const char* weights(int64_t j, int64_t* lines) const {
    *lines = std::min<int64_t>(16, w.rows - 16 * j) * words * 32 / 64;  // words * 16 bfloat16 a row
    return reinterpret_cast<const char*>(w.values + 16 * j * words * 16);
  }

  // Every position multiplies its x (the expanded zeros too): NaN/Inf propagate as in dense.
  void fix_nonfinite(const DenseInBf16&, const DenseOutBf16&) const {}
};

template <typename Unit>
void run_panels(const Unit& unit, const Sparse24MatrixBf16& w, const DenseInBf16& x, const uint16_t* bias,
                const DenseOutBf16& y, int num_threads) {
  const int64_t words = sparse24_padded_cols(w.cols) / Sparse24CpuConfig::kChunk;
  const int nt = w.rows * words * 16 * x.cols < Sparse24CpuConfig::kSerialWork ? 1 : num_threads;
  amx::run(unit, Sparse24Panels{w, words}, x, bias, y, nt);
}

}  // namespace

void sparse24_matmul_bf16_amx(const Sparse24MatrixBf16& w, const DenseInBf16& x, const uint16_t* bias,
                              const DenseOutBf16& y, int num_threads) {
  run_panels(amx::TileUnit{}, w, x, bias, y, num_threads);
}

void sparse24_matmul_bf16_dot(const Sparse24MatrixBf16& w, const DenseInBf16& x, const uint16_t* bias,
                              const DenseOutBf16& y, int num_threads) {
  run_panels(amx::DotUnit{}, w, x, bias, y, num_threads);
}

}  // namespace pyhwp
