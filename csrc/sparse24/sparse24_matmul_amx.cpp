// AMX and AVX512-BF16 2:4 matmuls for bfloat16 on the shared panel driver (common/amx_bf16.h).
// VDPBF16PS multiplies the kept pairs (Sparse24DotPanels, Dot24Unit, below). The tile unit has no
// use for the zeros a 2:4 weight skips, so for it each panel is expanded to dense 16 x 32 blocks
// (one per metadata word, every step a K = 32 product). From batch 8 the bfloat16 2:4 vector
// kernels lose to torch's dense AMX product (0.4-0.6x at batch 8 and 16, 0.2-0.3x at 128); the
// expanded product does the dense work from half the weight bytes and measured 0.8-1.2x dense
// (bench/NOTES.md, stop 21).
#include <cstring>

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

// The panels of the VDPBF16PS 2:4 unit (Dot24Unit): no expansion. Word c of a panel takes the
// 1 KiB an expanded word takes, at b + 512 c: for each of its 8 groups g, at + 64 g, the 16 rows'
// kept pairs (slots 2g and 2g + 1, one 32-bit lane per row: the B operand of a VDPBF16PS, half the
// lines of the expanded group) and at + 64 g + 32 the pairs' VPSHUFB control (lane r picks the
// bytes of the inputs at row r's two positions out of the group's 4 inputs, which the unit
// broadcasts to every 128-bit lane).
struct Sparse24DotPanels : Sparse24Panels {
  int64_t prepare(int64_t j, uint16_t* b, amx::Step* steps) const {
    const int64_t kp2 = words * 16;  // slots per row
    const int rows_here = static_cast<int>(std::min<int64_t>(16, w.rows - 16 * j));
    const __mmask16 rows = avx512::tail_mask(rows_here);
    const __m512i row_words = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                 _mm512_set1_epi32(static_cast<int32_t>(words)));
    const uint32_t* meta = w.meta + 16 * j * words;
    const int64_t kt = (w.cols + 15) / 16;
    const __m512i three = _mm512_set1_epi32(3), bytes = _mm512_set1_epi32(0x202), odd = _mm512_set1_epi32(0x100);
    for (int64_t c = 0; c < words; ++c) {
      __m512 m[16];
      for (int r = 0; r < 16; ++r) {  // row r's 8 pairs of word c (32 bytes)
        m[r] = r < rows_here ? _mm512_castsi512_ps(_mm512_zextsi256_si512(_mm256_loadu_si256(
                                   reinterpret_cast<const __m256i*>(w.values + (16 * j + r) * kp2 + 16 * c))))
                             : _mm512_setzero_ps();
      }
      avx512::transpose16(m);  // m[g], lane r: row r's pair g
      const __m512i mv = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), rows, row_words, meta + c, 4);
      uint16_t* word = b + 2 * amx::kTile * c;
      for (int g = 0; g < 8; ++g) {
        const __m512i i0 = _mm512_and_si512(_mm512_srli_epi32(mv, 4 * g), three);
        const __m512i i1 = _mm512_and_si512(_mm512_srli_epi32(mv, 4 * g + 2), three);
        // input i's bytes 2i, 2i + 1 (x at byte 0 of the lane): i * 0x202 + 0x100 per 16 bits
        const __m512i lo = _mm512_add_epi32(_mm512_mullo_epi32(i0, bytes), odd);
        const __m512i hi = _mm512_add_epi32(_mm512_mullo_epi32(i1, bytes), odd);
        const __m512i ctrl = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
        _mm512_store_ps(reinterpret_cast<float*>(word + 64 * g), m[g]);
        _mm512_store_si512(word + 64 * g + 32, ctrl);
      }
      steps[c] = {static_cast<int32_t>(2 * c), 2 * c + 1 < kt};
    }
    return words;
  }

  // Slots multiply their own inputs only: the skipped positions are propagate_nonfinite's.
  void fix_nonfinite(const DenseInBf16& x, const DenseOutBf16& y) const {
    propagate_nonfinite(x, y,
                        [&](int64_t n, const unsigned char* flags) { return sparse24_stored_flags(w, n, flags); });
  }
};

// One pass of VDPBF16PS over a panel's words (Sparse24DotPanels) for the first R columns of one C
// tile: per group, the 4 inputs of column r broadcast (64 bits), shuffled into row r's pair by the
// control, times the kept pairs; one VDPBF16PS per group and column does the 32 useful products
// that the expanded product needs two for.
template <int R>
void dot24_pass(const uint16_t* b, const amx::Step* steps, int64_t count, const uint16_t* xa, int64_t nb,
                const char* prefetch, int64_t prefetch_lines, float* acc) {
  constexpr int64_t kBlock = 2 * amx::kTile;
  __m512 c[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) c[r] = _mm512_setzero_ps();
  for (int64_t s = 0; s < count; ++s) {
    amx::prefetch_share(prefetch, prefetch_lines, s, count);
    const amx::Step step = steps[s];
    const uint16_t* a = xa + int64_t{step.t / 2} * nb * kBlock;
    const int groups = step.pair ? 8 : 4;  // an odd last k-tile: its 4 groups (the rest of A is not packed)
    for (int g = 0; g < groups; ++g) {
      const __m512bh wv = reinterpret_cast<__m512bh>(_mm512_load_si512(b + 64 * g));
      const __m512i ctrl = _mm512_load_si512(b + 64 * g + 32);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        int64_t four;
        std::memcpy(&four, a + 32 * r + 4 * g, sizeof four);
        const __m512i xs = _mm512_shuffle_epi8(_mm512_set1_epi64(four), ctrl);
        c[r] = _mm512_dpbf16_ps(c[r], reinterpret_cast<__m512bh>(xs), wv);
      }
    }
    b += 2 * amx::kTile;
  }
#pragma GCC unroll 16
  for (int r = 0; r < 16; ++r) _mm512_store_ps(acc + 16 * r, r < R ? c[r] : _mm512_setzero_ps());
}

struct Dot24Unit : amx::OneTileUnit<Dot24Unit> {
  template <int R>
  static void pass_of(const uint16_t* b, const amx::Step* steps, int64_t count, const uint16_t* xa, int64_t nb,
                      const char* prefetch, int64_t prefetch_lines, float* acc) {
    dot24_pass<R>(b, steps, count, xa, nb, prefetch, prefetch_lines, acc);
  }
};

template <typename Unit, typename Panels>
void run_panels(const Unit& unit, const Panels& panels, const DenseInBf16& x, const uint16_t* bias,
                const DenseOutBf16& y, int num_threads) {
  const int64_t slots = panels.w.rows * panels.words * 16;
  const int nt = slots * x.cols < Sparse24CpuConfig::kSerialWork ? 1 : num_threads;
  amx::run(unit, panels, x, bias, y, nt);
}

int64_t words_of(const Sparse24MatrixBf16& w) { return sparse24_padded_cols(w.cols) / Sparse24CpuConfig::kChunk; }

}  // namespace

void sparse24_matmul_bf16_amx(const Sparse24MatrixBf16& w, const DenseInBf16& x, const uint16_t* bias,
                              const DenseOutBf16& y, int num_threads) {
  run_panels(amx::TileUnit{}, Sparse24Panels{w, words_of(w)}, x, bias, y, num_threads);
}

void sparse24_matmul_bf16_dot(const Sparse24MatrixBf16& w, const DenseInBf16& x, const uint16_t* bias,
                              const DenseOutBf16& y, int num_threads) {
  run_panels(Dot24Unit{}, Sparse24DotPanels{{w, words_of(w)}}, x, bias, y, num_threads);
}

}  // namespace pyhwp
