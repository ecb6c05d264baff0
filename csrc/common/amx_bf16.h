// The bfloat16 panel driver of the AMX matmul kernels (masked and 2:4) and of their AVX512-BF16
// twins (include only from files built with the AMX flags): Y (N x P) = W X + bias with bfloat16
// W, X, bias and Y, W walked in panels of 16 rows whose source (Panels) rearranges them into the
// tile unit's B layout.
//
// Roles (C += A B, TDPBF16PS): A is 16 columns p of X by 16 or 32 k (one or two k-tiles of 16),
// B the panel's weights over the same k as (k pair, row n, 2), C a 16 (p) x 16 (n) float32 block
// of Y. X is packed once per call (pack_x; a small X by every thread for itself); a panel's steps
// then feed a group of C tiles per pass, each step one B tile and one A tile per C tile.
// The unit takes as long for K = 16 as for K = 32, so steps cover two k-tiles wherever the
// panel's weights do.
//
// Two units run the passes: TileUnit on the AMX tile unit (4 C tiles, 64 columns, per pass) and
// DotUnit on AVX512-BF16's VDPBF16PS (one C tile per pass in 16 zmm registers, each B line, the
// 16 rows n of one k pair, one register), for CPUs with AVX512-BF16 but no AMX (AMD Zen 4 and
// later). Both read the same packed X and B and write the same C blocks.
//
// Products are exact and sums float32 in the unit's order; like every AMX or VDPBF16PS bfloat16
// product it reads subnormal inputs as zero and flushes subnormal sums (DAZ/FTZ).
#pragma once
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/bf16.h"
#include "common/dense.h"
#include "common/simd_avx512.h"

namespace pyhwp::amx {

constexpr int kTileGroup = 4;  // C tiles (blocks of 16 columns of Y) per pass of the tile unit
// VPERMW indices that interleave the two halves of a register of 32 bfloat16: lanes 2i and 2i + 1
// get elements i and 16 + i (two rows of 16 values into 16 pairs, the units' B and A pair layout).
alignas(64) inline constexpr uint16_t kPairInterleave[32] = {0,  16, 1,  17, 2,  18, 3,  19, 4,  20, 5,
                                                             21, 6,  22, 7,  23, 8,  24, 9,  25, 10, 26,
                                                             11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
constexpr int64_t kTile = 256;  // bfloat16 values of a 16 x 16 block (512 bytes)
// Up to this many bytes of packed X, every thread packs all of X into its own scratch: no barrier
// after the pack, and no X lines written by one core and read by the other on every call
// (masked 1536x384, batch 128, 75% zero tiles, 2 threads, with the panel balance of
// masked_matmul_amx.cpp: 63-79 -> 55-66 us). Above, the threads pack it together into one buffer.
constexpr int64_t kOwnPackBytes = int64_t{1} << 20;

// One step of a panel: k-tile t, or k-tiles t and t + 1 (pair, t even), with B at the next 256
// (512 for a pair) values of the panel's B buffer.
struct Step {
  int32_t t;
  int32_t pair;
};

// A tile configuration (palette 1) for _tile_loadconfig: set(t, rows, bytes) shapes register t.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  void set(int t, int r, int bytes) {
    rows[t] = static_cast<uint8_t>(r);
    colsb[t] = static_cast<uint16_t>(bytes);
  }
};
static_assert(sizeof(TileConfig) == 64, "ldtilecfg reads 64 bytes");

// The matmul driver's registers: tmm0-3 hold C (16 rows x 64 bytes of float32); a single step:
// B in tmm4 (8 k pairs x 16 n x 2), A in tmm5 (16 p x 16 k); a pair: B in tmm6 (16 x 16 x 2), A in
// tmm7 (16 p x 32 k). One A register per shape serves the C tiles in turn (measured as fast as
// three alternating ones).
inline TileConfig matmul_tiles() {
  TileConfig c;
  for (int t = 0; t < kTileGroup; ++t) c.set(t, 16, 64);
  c.set(4, 8, 64);
  c.set(5, 16, 32);
  c.set(6, 16, 64);
  c.set(7, 16, 64);
  return c;
}

// The 16 x 16 block of X at k-tile t, columns 16 b.. as rows[r] = X(16 t .. 16 t + 15, 16 b + r),
// zeros past K and P.
inline void load_block(const DenseInBf16& x, int64_t t, int64_t b, __m256i rows[16]) {
  const int64_t K = x.rows, P = x.cols, k0 = 16 * t, p0 = 16 * b;
  if (x.stride_k == 1) {  // linear: a column's k are contiguous
    const __mmask16 km = avx512::tail_mask(K - k0);
    for (int r = 0; r < 16; ++r) {
      rows[r] = p0 + r < P ? _mm256_maskz_loadu_epi16(km, x.data + (p0 + r) * x.stride_p + k0)
                           : _mm256_setzero_si256();
    }
  } else if (x.stride_p == 1) {  // conv patch matrix: load k rows, transpose as 32-bit lanes
    const __mmask16 pm = avx512::tail_mask(P - p0);
    __m512 m[16];
    for (int c = 0; c < 16; ++c) {
      const __m256i v = k0 + c < K ? _mm256_maskz_loadu_epi16(pm, x.data + (k0 + c) * x.stride_k + p0)
                                   : _mm256_setzero_si256();
      m[c] = _mm512_castsi512_ps(_mm512_cvtepu16_epi32(v));
    }
    avx512::transpose16(m);
    for (int r = 0; r < 16; ++r) rows[r] = _mm512_cvtepi32_epi16(_mm512_castps_si512(m[r]));
  } else {
    for (int r = 0; r < 16; ++r) {
      alignas(32) uint16_t lanes[16] = {};
      for (int c = 0; c < 16 && p0 + r < P && k0 + c < K; ++c) {
        lanes[c] = x.data[(k0 + c) * x.stride_k + (p0 + r) * x.stride_p];
      }
      rows[r] = _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes));
    }
  }
}

// X packed for the A tiles, by pairs of k-tiles: block (k-tiles 2u and 2u + 1, 16 columns from 16 b)
// at x_packed + (u * nb + b) * 512, column 16 b + r's 32 k contiguous (A's row r, 64 bytes), zeros
// past K and P. A pair's A tile is 16 rows 64 bytes apart; one k-tile's is the same rows' half
// (an odd last k-tile has no partner, its pair's other half is never read). Packs column block b;
// returns whether it holds a NaN or Inf.
inline bool pack_x(const DenseInBf16& x, int64_t kt, int64_t nb, int64_t b, uint16_t* x_packed) {
  __mmask16 bad = 0;
  const __m256i expo = _mm256_set1_epi16(0x7f80);
  for (int64_t t = 0; t < kt; ++t) {
    uint16_t* dst = x_packed + ((t / 2) * nb + b) * 2 * kTile + 16 * (t % 2);
    __m256i rows[16];
    load_block(x, t, b, rows);
    for (int r = 0; r < 16; ++r) {
      bad |= _mm256_cmpeq_epi16_mask(_mm256_and_si256(rows[r], expo), expo);
      _mm256_store_si256(reinterpret_cast<__m256i*>(dst + 32 * r), rows[r]);
    }
  }
  return bad != 0;
}

// Step s's share of `lines` prefetch lines (the next panel's weights, into L2), spread over a
// pass of `count` steps.
inline void prefetch_share(const char* prefetch, int64_t lines, int64_t s, int64_t count) {
  const int64_t per_step = (lines + count - 1) / count;
  for (int64_t l = s * per_step; l < std::min(lines, (s + 1) * per_step); ++l) {
    _mm_prefetch(prefetch + 64 * l, _MM_HINT_T1);
  }
}

// One pass of the tile unit over a panel's steps for NB (1..kTileGroup) C tiles; leaves them in acc
// (NB blocks of 16 p x 16 n float32). xa: the first C tile's A block of k-tiles 0 and 1. Meanwhile
// `prefetch_lines` lines from `prefetch` (the next panel's weights) go to L2, spread over the steps.
template <int NB>
void panel_pass(const uint16_t* b, const Step* steps, int64_t count, const uint16_t* xa, int64_t nb,
                const char* prefetch, int64_t prefetch_lines, float* acc) {
  constexpr int64_t kBlock = 2 * kTile;  // packed X per (pair of k-tiles, 16 columns)
  _tile_zero(0);
  if (NB > 1) _tile_zero(1);
  if (NB > 2) _tile_zero(2);
  if (NB > 3) _tile_zero(3);
  for (int64_t s = 0; s < count; ++s) {
    prefetch_share(prefetch, prefetch_lines, s, count);
    const Step step = steps[s];
    const uint16_t* a = xa + int64_t{step.t / 2} * nb * kBlock;
    // The two step kinds are spelled out: gcc's tile intrinsics paste their register numbers into
    // the asm text, so they take literals, not template parameters.
    if (step.pair) {  // k-tiles t, t + 1: K = 32
      _tile_loadd(6, b, 64);
      _tile_loadd(7, a, 64);
      _tile_dpbf16ps(0, 7, 6);
      if (NB > 1) {
        _tile_loadd(7, a + kBlock, 64);
        _tile_dpbf16ps(1, 7, 6);
      }
      if (NB > 2) {
        _tile_loadd(7, a + 2 * kBlock, 64);
        _tile_dpbf16ps(2, 7, 6);
      }
      if (NB > 3) {
        _tile_loadd(7, a + 3 * kBlock, 64);
        _tile_dpbf16ps(3, 7, 6);
      }
      b += 2 * kTile;
      continue;
    }
    a += 16 * (step.t % 2);  // k-tile t: its half of the pair block
    _tile_loadd(4, b, 64);
    _tile_loadd(5, a, 64);
    _tile_dpbf16ps(0, 5, 4);
    if (NB > 1) {
      _tile_loadd(5, a + kBlock, 64);
      _tile_dpbf16ps(1, 5, 4);
    }
    if (NB > 2) {
      _tile_loadd(5, a + 2 * kBlock, 64);
      _tile_dpbf16ps(2, 5, 4);
    }
    if (NB > 3) {
      _tile_loadd(5, a + 3 * kBlock, 64);
      _tile_dpbf16ps(3, 5, 4);
    }
    b += kTile;
  }
  _tile_stored(0, acc, 64);
  if (NB > 1) _tile_stored(1, acc + kTile, 64);
  if (NB > 2) _tile_stored(2, acc + 2 * kTile, 64);
  if (NB > 3) _tile_stored(3, acc + 3 * kTile, 64);
}

// Writes block acc (16 p x 16 n float32, p rows) + bias to Y at columns p0.. and rows n0..,
// rounded to bfloat16 (VCVTNE2PS2BF16: nearest even, NaN kept quiet as float_to_bf16 does, and
// subnormal sums, which the unit never produces, flushed as the unit flushes them): `cols`
// columns and `rows` rows are inside Y.
inline void store_block(const float* acc, const float* bias, int rows, int64_t cols, const DenseOutBf16& y,
                        int64_t n0, int64_t p0) {
  const __mmask16 nm = avx512::tail_mask(rows);
  if (y.stride_n == 1) {  // linear: a row p of the block is 16 consecutive outputs
    const __m512 b = _mm512_maskz_loadu_ps(nm, bias);
    for (int64_t r = 0; r < cols; r += 2) {
      const __m512 lo = _mm512_add_ps(_mm512_load_ps(acc + 16 * r), b);
      const __m512 hi = _mm512_add_ps(_mm512_load_ps(acc + 16 * r + 16), b);
      const __m512i v = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
      _mm256_mask_storeu_epi16(y.data + (p0 + r) * y.stride_p + n0, nm, _mm512_castsi512_si256(v));
      if (r + 1 < cols) {
        _mm256_mask_storeu_epi16(y.data + (p0 + r + 1) * y.stride_p + n0, nm, _mm512_extracti64x4_epi64(v, 1));
      }
    }
    return;
  }
  __m512 m[16];
  for (int r = 0; r < 16; ++r) m[r] = _mm512_load_ps(acc + 16 * r);
  avx512::transpose16(m);  // m[n]: output row n, 16 columns p
  for (int n = 0; n < rows; n += 2) {
    const __m512 lo = _mm512_add_ps(m[n], _mm512_set1_ps(bias[n]));
    const __m512 hi = _mm512_add_ps(m[n + 1], _mm512_set1_ps(bias[n + 1]));
    const __m512i v = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
    for (int h = 0; h < 2 && n + h < rows; ++h) {
      const __m256i row = h ? _mm512_extracti64x4_epi64(v, 1) : _mm512_castsi512_si256(v);
      uint16_t* out = y.data + (n0 + n + h) * y.stride_n + p0 * y.stride_p;
      if (y.stride_p == 1) {  // conv: an output row's columns are contiguous
        _mm256_mask_storeu_epi16(out, avx512::tail_mask(cols), row);
      } else {
        alignas(32) uint16_t lanes[16];
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), row);
        for (int64_t c = 0; c < cols; ++c) out[c * y.stride_p] = lanes[c];
      }
    }
  }
}

// The tile unit: the configuration of matmul_tiles for each thread's passes, then panel_pass.
struct TileUnit {
  static constexpr int kGroup = kTileGroup;
  void begin() const {
    const TileConfig config = matmul_tiles();
    _tile_loadconfig(&config);
  }
  void end() const { _tile_release(); }
  void pass(int blocks, int64_t, const uint16_t* b, const Step* steps, int64_t count, const uint16_t* xa,
            int64_t nb, const char* prefetch, int64_t prefetch_lines, float* acc) const {
    switch (blocks) {
      case 4: panel_pass<4>(b, steps, count, xa, nb, prefetch, prefetch_lines, acc); break;
      case 3: panel_pass<3>(b, steps, count, xa, nb, prefetch, prefetch_lines, acc); break;
      case 2: panel_pass<2>(b, steps, count, xa, nb, prefetch, prefetch_lines, acc); break;
      default: panel_pass<1>(b, steps, count, xa, nb, prefetch, prefetch_lines, acc); break;
    }
  }
};

// One step of the AVX512-BF16 pass: `Pairs` k pairs (8: one k-tile, 16: two) of B, each line one
// register, times the same pairs of the first R columns of A (row r 64 bytes apart, a pair one
// 32-bit broadcast) into c[0..R).
template <int R, int Pairs>
inline void dot_step(const uint16_t* b, const uint16_t* a, __m512 c[R]) {
#pragma GCC unroll 16
  for (int i = 0; i < Pairs; ++i) {
    const __m512bh w = reinterpret_cast<__m512bh>(_mm512_load_si512(b + 32 * i));
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + 32 * r + 2 * i, sizeof pair);
      c[r] = _mm512_dpbf16_ps(c[r], reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair)), w);
    }
  }
}

// One pass of VDPBF16PS over a panel's steps for the first R columns of one C tile (rows R..15 of
// acc are written as zeros); xa as in panel_pass.
template <int R>
void dot_pass(const uint16_t* b, const Step* steps, int64_t count, const uint16_t* xa, int64_t nb,
              const char* prefetch, int64_t prefetch_lines, float* acc) {
  constexpr int64_t kBlock = 2 * kTile;
  __m512 c[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) c[r] = _mm512_setzero_ps();
  for (int64_t s = 0; s < count; ++s) {
    prefetch_share(prefetch, prefetch_lines, s, count);
    const Step step = steps[s];
    const uint16_t* a = xa + int64_t{step.t / 2} * nb * kBlock;
    if (step.pair) {
      dot_step<R, 16>(b, a, c);
      b += 2 * kTile;
    } else {
      dot_step<R, 8>(b, a + 16 * (step.t % 2), c);
      b += kTile;
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < 16; ++r) _mm512_store_ps(acc + 16 * r, r < R ? c[r] : _mm512_setzero_ps());
}

// A unit of one C tile per pass (VDPBF16PS): Derived::pass_of<R> computes its first R columns,
// `cols` rounded up to 4 (a tile of 1-4 columns, batch 1-4, costs a quarter of a full one).
template <typename Derived>
struct OneTileUnit {
  static constexpr int kGroup = 1;
  void begin() const {}
  void end() const {}
  void pass(int, int64_t cols, const uint16_t* b, const Step* steps, int64_t count, const uint16_t* xa,
            int64_t nb, const char* prefetch, int64_t prefetch_lines, float* acc) const {
    switch ((cols + 3) / 4) {
      case 1: Derived::template pass_of<4>(b, steps, count, xa, nb, prefetch, prefetch_lines, acc); break;
      case 2: Derived::template pass_of<8>(b, steps, count, xa, nb, prefetch, prefetch_lines, acc); break;
      case 3: Derived::template pass_of<12>(b, steps, count, xa, nb, prefetch, prefetch_lines, acc); break;
      default: Derived::template pass_of<16>(b, steps, count, xa, nb, prefetch, prefetch_lines, acc); break;
    }
  }
};

// The AVX512-BF16 unit over the tile unit's B layout.
struct DotUnit : OneTileUnit<DotUnit> {
  template <int R>
  static void pass_of(const uint16_t* b, const Step* steps, int64_t count, const uint16_t* xa, int64_t nb,
                      const char* prefetch, int64_t prefetch_lines, float* acc) {
    dot_pass<R>(b, steps, count, xa, nb, prefetch, prefetch_lines, acc);
  }
};

// The driver. Panels (one per weight format) provides:
//   w                                                          the weight (w.rows = N, w.cols = K)
//   void runs(int nt, std::vector<int64_t>* runs) const;       nt + 1 bounds of contiguous panel
//                                                              runs of about equal work
//   int64_t capacity(int64_t first, int64_t last) const;       B values of the largest panel
//   int64_t prepare(int64_t j, uint16_t* b, Step* s) const;    panel j's B tiles and steps; the
//                                                              step count (<= capacity / 256)
//   const char* weights(int64_t j, int64_t* lines) const;      panel j's stored weights, lines
//   void fix_nonfinite(const DenseInBf16& x, const DenseOutBf16& y) const;
//                                                              after a NaN/Inf in X: what the
//                                                              skipped weights leave undone
// Scratch slots: the driver uses 0 (calling thread: bias, shared X), 1 (every thread: C, B,
// steps) and 2 (threads > 0: their own X); slot 3 is the Panels' own.
template <typename Unit, typename Panels>
void run(const Unit& unit, const Panels& w, const DenseInBf16& x, const uint16_t* bias, const DenseOutBf16& y,
         int nt) {
  const int64_t N = w.w.rows, K = w.w.cols, P = x.cols;
  const int64_t npanels = (N + 15) / 16, kt = (K + 15) / 16;
  const int64_t nb = (P + 15) / 16;  // blocks of 16 columns

  // Scratch of the calling thread: the float32 bias, then packed X when the threads share it.
  const int64_t xfloats = (kt + 1) / 2 * nb * kTile;  // pairs of k-tiles x blocks x 512 bf16
  const int64_t bias_floats = 16 * npanels;
  float* bias_f = scratch(0, bias_floats + xfloats);
  uint16_t* shared_x = reinterpret_cast<uint16_t*>(bias_f + bias_floats);
  std::fill(bias_f, bias_f + bias_floats, 0.f);
  widen_bf16(bias, N, bias_f);  // (nothing for no bias)
  std::vector<int64_t> runs;
  w.runs(nt, &runs);
  const bool own_x = nt == 1 || xfloats * 4 <= kOwnPackBytes;
  int bad = 0;

#pragma omp parallel num_threads(nt) reduction(| : bad)
  {
    uint16_t* x_packed = shared_x;
    if (own_x) {
      if (omp_get_thread_num() > 0) x_packed = reinterpret_cast<uint16_t*>(scratch(2, xfloats));
      for (int64_t b = 0; b < nb; ++b) bad |= pack_x(x, kt, nb, b, x_packed);
    } else {
#pragma omp for schedule(static)
      for (int64_t b = 0; b < nb; ++b) bad |= pack_x(x, kt, nb, b, x_packed);
    }
    // gcc's _tile_loadd does not tell the compiler that it reads memory: keep the stores above.
    asm volatile("" ::: "memory");

    unit.begin();
    const int t = omp_get_thread_num(), threads = omp_get_num_threads();
    // A runtime that gave fewer threads than asked: split the panels evenly instead.
    const int64_t first = threads == nt ? runs[t] : npanels * t / threads;
    const int64_t last = threads == nt ? runs[t + 1] : npanels * (t + 1) / threads;
    const int64_t capacity = w.capacity(first, last);
    // The accumulators, B (64-byte aligned), then the steps (8 bytes each, at most one per tile).
    float* acc = scratch(1, Unit::kGroup * kTile + capacity / 2 + 2 * (capacity / kTile));
    uint16_t* b = reinterpret_cast<uint16_t*>(acc + Unit::kGroup * kTile);
    Step* steps = reinterpret_cast<Step*>(b + capacity);
    for (int64_t j = first; j < last; ++j) {
      const int64_t count = w.prepare(j, b, steps);
      asm volatile("" ::: "memory");  // (as after the pack)
      int64_t next_lines = 0;
      const char* next = j + 1 < last ? w.weights(j + 1, &next_lines) : nullptr;
      const int64_t n0 = 16 * j;
      const int rows = static_cast<int>(std::min<int64_t>(16, N - n0));
      for (int64_t b0 = 0; b0 < nb; b0 += Unit::kGroup) {
        const int blocks = static_cast<int>(std::min<int64_t>(Unit::kGroup, nb - b0));
        const uint16_t* xa = x_packed + b0 * 2 * kTile;
        const int64_t pf = b0 == 0 ? next_lines : 0;  // prefetch during the first pass only
        unit.pass(blocks, std::min<int64_t>(16 * blocks, P - 16 * b0), b, steps, count, xa, nb, next, pf, acc);
        for (int i = 0; i < blocks; ++i) {
          const int64_t p0 = 16 * (b0 + i);
          store_block(acc + i * kTile, bias_f + n0, rows, std::min<int64_t>(16, P - p0), y, n0, p0);
        }
      }
    }
    unit.end();
  }
  if (bad) w.fix_nonfinite(x, y);
}

}  // namespace pyhwp::amx
