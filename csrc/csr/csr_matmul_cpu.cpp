// CPU CSR matmul: validation, the one ISA dispatch point, work partitioning, and the portable
// scalar kernels. The float32 and bfloat16 entry points share one driver (run_csr).
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/bf16.h"
#include "common/checks.h"
#include "common/cpu_features.h"
#include "common/transpose.h"
#include "csr/csr_kernels_inl.h"
#include "csr/csr_matmul.h"
#include "csr/csr_sell.h"

namespace pyhwp {

namespace {

template <typename I>
void check_structure(int64_t rows, int64_t cols, int64_t nnz, const int64_t* ro, const I* ci,
                     const char* what) {
  for (int64_t n = 0; n < rows; ++n) {
    for (int64_t j = ro[n]; j < ro[n + 1]; ++j) {
      const int64_t c = ci[j];
      PYHWP_CHECK(c >= 0 && c < cols, "CSR: ", what, " ", c, " at position ", j, " is outside [0, ", cols, ")");
      PYHWP_CHECK(j == ro[n] || c > static_cast<int64_t>(ci[j - 1]), "CSR: ", what, " of row ", n,
                  " are not strictly increasing at position ", j);
    }
  }
  (void)nnz;
}

}  // namespace

void csr_validate(const CsrMatrix& w) {
  PYHWP_CHECK(w.rows >= 0 && w.cols >= 0 && w.nnz >= 0, "CSR sizes must be non-negative");
  PYHWP_CHECK(w.cols <= INT32_MAX, "CSR: ", w.cols, " columns do not fit int32 column indices");
  PYHWP_CHECK(w.row_offsets != nullptr, "CSR: row_offsets is null");
  PYHWP_CHECK(w.nnz == 0 || ((w.col_indices || w.col_indices16) && w.values),
              "CSR: indices or values are null");
  PYHWP_CHECK(w.row_offsets[0] == 0, "CSR: row_offsets[0] is ", w.row_offsets[0], ", expected 0");
  for (int64_t n = 0; n < w.rows; ++n) {
    PYHWP_CHECK(w.row_offsets[n + 1] >= w.row_offsets[n], "CSR: row_offsets decrease at row ", n);
  }
  PYHWP_CHECK(w.row_offsets[w.rows] == w.nnz, "CSR: row_offsets[-1] is ", w.row_offsets[w.rows],
              ", expected nnz = ", w.nnz);
  if (w.col_indices) check_structure(w.rows, w.cols, w.nnz, w.row_offsets, w.col_indices, "column index");
  if (w.col_indices16) {
    PYHWP_CHECK(w.cols <= 65536, "CSR: 16-bit column indices need cols <= 65536, got ", w.cols);
    check_structure(w.rows, w.cols, w.nnz, w.row_offsets, w.col_indices16, "16-bit column index");
    if (w.col_indices) {
      for (int64_t j = 0; j < w.nnz; ++j) {
        PYHWP_CHECK(w.col_indices16[j] == w.col_indices[j], "CSR: 16-bit column index at position ",
                    j, " differs from the int32 one");
      }
    }
  }
}

// -- scalar kernels (any CPU) -----------------------------------------------------------------

namespace {

template <typename I, typename T>
void gather_scalar(CsrArrays<I, T> a, const int64_t* begin, int64_t rows, const float* x, int64_t ldx,
                   int64_t P, const float* bias, float* y, int64_t ldy_n, int64_t ldy_p) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t p = 0; p < P; ++p) {
      const float* xr = x + p * ldx;
      float acc = 0.f;
      for (int64_t j = begin[i]; j < begin[i + 1]; ++j) acc += to_float(a.vals[j]) * xr[a.cols[j]];
      y[i * ldy_n + p * ldy_p] = acc + (bias ? bias[i] : 0.f);
    }
  }
}

template <typename I, typename T>
void tile_scalar(CsrArrays<I, T> a, const int64_t* begin, const int64_t* end, int64_t rows,
                 const float* x, int64_t ldx, int64_t P, const float* bias, bool accumulate, bool /*stream_w*/,
                 float* y, int64_t ldy) {
  for (int64_t i = 0; i < rows; ++i) {
    float* out = y + i * ldy;
    if (!accumulate) {
      const float b = bias ? bias[i] : 0.f;
      for (int64_t p = 0; p < P; ++p) out[p] = b;
    }
    for (int64_t j = begin[i]; j < end[i]; ++j) {
      const float v = to_float(a.vals[j]);
      const float* xr = x + static_cast<int64_t>(a.cols[j]) * ldx;
      for (int64_t p = 0; p < P; ++p) out[p] += v * xr[p];
    }
  }
}

}  // namespace

template <typename I, typename T>
CsrKernels<I, T> csr_kernels_scalar() {
  return {&gather_scalar<I, T>, &tile_scalar<I, T>};
}
template CsrKernels<int32_t, float> csr_kernels_scalar();
template CsrKernels<uint16_t, float> csr_kernels_scalar();
template CsrKernels<int32_t, uint16_t> csr_kernels_scalar();
template CsrKernels<uint16_t, uint16_t> csr_kernels_scalar();

template <typename I, typename T>
CsrKernels<I, T> csr_kernels(Isa isa) {
  switch (isa) {
#ifdef PYHWP_X86_KERNELS
    case Isa::kAvx512: return csr_kernels_avx512<I, T>();
    case Isa::kAvx2: return csr_kernels_avx2<I, T>();
#endif
    default: return csr_kernels_scalar<I, T>();
  }
}
template CsrKernels<int32_t, float> csr_kernels(Isa);
template CsrKernels<uint16_t, float> csr_kernels(Isa);
template CsrKernels<int32_t, uint16_t> csr_kernels(Isa);
template CsrKernels<uint16_t, uint16_t> csr_kernels(Isa);

// -- the driver ---------------------------------------------------------------------------------

namespace {

using Cfg = CsrCpuConfig;

// The work units [front, back) of a chunk not yet claimed, front in the low 32 bits, on a cache
// line of its own. The chunk's thread claims from the front, a quarter of what is left at a time
// (a handful of uncontended atomics per call); a thread done with its own chunk claims the back
// half of what is left, and again, down to single units, so that the two finish together.
struct alignas(64) Units {
  std::atomic<uint64_t> word{0};

  void reset(uint32_t count) { word.store(uint64_t{count} << 32, std::memory_order_relaxed); }

  // run(u0, u1) for the claimed units [u0, u1).
  template <typename Run>
  void take_front(Run run) {
    for (;;) {
      const uint64_t seen = word.load(std::memory_order_relaxed);
      const uint32_t left_front = static_cast<uint32_t>(seen), left_back = static_cast<uint32_t>(seen >> 32);
      if (left_front >= left_back) return;
      const uint32_t take = std::max<uint32_t>(1, (left_back - left_front) / 4);
      const uint64_t w = word.fetch_add(take, std::memory_order_relaxed);  // past back: nothing claimed
      const uint32_t front = static_cast<uint32_t>(w), back = static_cast<uint32_t>(w >> 32);
      if (front >= back) return;
      run(int64_t{front}, int64_t{std::min(front + take, back)});
    }
  }

  template <typename Run>
  void take_back_halves(Run run) {
    uint64_t w = word.load(std::memory_order_relaxed);
    for (;;) {
      const uint32_t front = static_cast<uint32_t>(w), back = static_cast<uint32_t>(w >> 32);
      if (front >= back) return;
      const uint32_t from = back - (back - front + 1) / 2;
      if (!word.compare_exchange_weak(w, uint64_t{from} << 32 | front, std::memory_order_relaxed)) continue;
      run(int64_t{from}, int64_t{back});
      w = word.load(std::memory_order_relaxed);
    }
  }
};

// Float32 X as the kernels read it: `data` with element (k, p) at data[k*sk + p*sp].
struct XView {
  const float* data;
  int64_t sk, sp;
};

// The output the driver writes: float32 with strides (fp32 entry) or, for bfloat16, a float32
// scratch N x P (p contiguous) converted at the end.
struct YView {
  float* data;
  int64_t sn, sp;
};

template <typename I, typename T>
struct Problem {
  CsrArrays<I, T> a;
  const int64_t* ro;
  int64_t N, K, P;
  bool resident;  // CsrMatrix::resident
};

// The gather path serves P below this (with the vector kernels, fewer columns where gathers are slow).
int64_t gather_max_p(Isa isa) {
  return isa != Isa::kScalar && slow_gathers() ? Cfg::kGatherMaxPSlowGathers : Cfg::kGatherMaxP;
}

// Gather path: x rows contiguous (ldx apart), small P.
template <typename I, typename T>
void run_gather(const Problem<I, T>& pr, const CsrKernels<I, T>& kern, const float* x, int64_t ldx,
                const float* bias, YView y, int nt) {
  // One nnz-balanced run of rows per thread, the same run on every call: each thread streams
  // one contiguous part of W (4 parts per thread handed out dynamically: up to 1.25x slower at
  // batch 1, 3072x768).
  const int64_t parts = nt;
  std::vector<int64_t> bounds;
  balanced_runs(pr.ro, pr.N, Cfg::kRowCost, parts, &bounds);
#pragma omp parallel for num_threads(nt) schedule(static, 1)
  for (int64_t c = 0; c < parts; ++c) {
    const int64_t r0 = bounds[static_cast<size_t>(c)], r1 = bounds[static_cast<size_t>(c + 1)];
    if (r1 > r0) {
      kern.gather(pr.a, pr.ro + r0, r1 - r0, x, ldx, pr.P, bias ? bias + r0 : nullptr,
                  y.data + r0 * y.sn, y.sn, y.sp);
    }
  }
}

// Tile path: X with p contiguous (K x ldx; packed to aligned rows, or read in place). Rows are
// split into nnz-balanced chunks;
// columns into tiles of kTileP; when a tile's X panel exceeds kPanelBytes, K is split into blocks
// and each chunk accumulates its rows block by block in scratch.
// With scan_x (X read in place, not packed), the work items also look for NaN/Inf in X, each in
// its own part of it, and the result says whether they found one; without, it is false.
// With pack (x then unused), every thread first packs its own copy: pack(&bad) returns it and
// ORs into bad whether X holds a NaN/Inf (see run_csr).
template <typename I, typename T, typename Pack = std::nullptr_t>
bool run_tile(const Problem<I, T>& pr, const CsrKernels<I, T>& kern, TransposeFn transpose,
              const float* x, int64_t ldx, const float* bias, YView y, int nt, bool scan_x, Pack pack = nullptr) {
  const int64_t N = pr.N, K = pr.K, P = pr.P;
  const int64_t tile_p = std::min<int64_t>(Cfg::kTileP, (P + 15) / 16 * 16);
  const int64_t kblock = std::max<int64_t>(64, Cfg::kPanelBytes / (4 * tile_p)) / 16 * 16;
  const int64_t nkb = (K + kblock - 1) / kblock;
  const int64_t ptiles = (P + tile_p - 1) / tile_p;
  const bool direct = y.sp == 1;
  const int64_t parts = nt;
  std::vector<int64_t> bounds;
  balanced_runs(pr.ro, N, Cfg::kRowCost, parts, &bounds);
  // Many column tiles and few rows (conv images): spread the column tiles over threads instead,
  // in groups of consecutive tiles when X is read in place (below).
  const bool by_columns = nkb == 1 && ptiles >= 2 * nt;
  const bool stream_w = !pr.resident;
  // With X in place, a group's panel is scanned for NaN/Inf first, which also brings it into
  // cache ahead of the kernel's scattered reads of its rows; wider groups scan longer runs of each
  // row (see kScanGroupBytes). The groups are a multiple of the thread count where possible.
  int64_t groups = ptiles;
  if (by_columns && scan_x) {
    const int64_t fit = std::max<int64_t>(1, Cfg::kScanGroupBytes / (std::max<int64_t>(K, 1) * tile_p * 4));
    groups = std::min(ptiles, ((ptiles + fit - 1) / fit + nt - 1) / nt * nt);
  }
  const int64_t items = by_columns ? groups : parts * ptiles;
  bool bad = false;

  // One tile: rows [r0, r1) of chunk c over column tile pt.
  auto run_item = [&](const float* xv, int64_t r0, int64_t r1, int64_t pt) {
    const int64_t p0 = pt * tile_p, width = std::min(tile_p, P - p0);
    const float* xt = xv + p0;
    if (nkb == 1) {
      float* tile = direct ? nullptr : scratch(1, Cfg::kRowBlock * Cfg::kTileP);
      for (int64_t rb = r0; rb < r1; rb += Cfg::kRowBlock) {
        const int64_t rows = std::min(Cfg::kRowBlock, r1 - rb);
        const float* b = bias ? bias + rb : nullptr;
        if (direct) {
          kern.tile(pr.a, pr.ro + rb, pr.ro + rb + 1, rows, xt, ldx, width, b, false, stream_w,
                    y.data + rb * y.sn + p0, y.sn);
        } else {
          kern.tile(pr.a, pr.ro + rb, pr.ro + rb + 1, rows, xt, ldx, width, b, false, stream_w, tile, Cfg::kTileP);
          // Y(n, p) at y.data[n*sn + p*sp]: with sn == 1 each p gets 16 consecutive n.
          for (int64_t q = 0; q < width; q += 16) {
            const int64_t cols = std::min<int64_t>(16, width - q);
            float* dst = y.data + rb * y.sn + (p0 + q) * y.sp;
            if (y.sn == 1) {
              transpose(tile + q, Cfg::kTileP, dst, y.sp, rows, cols);
            } else {
              for (int64_t i = 0; i < rows; ++i)
                for (int64_t j = 0; j < cols; ++j) dst[i * y.sn + j * y.sp] = tile[i * Cfg::kTileP + q + j];
            }
          }
        }
      }
      return;
    }
    // K blocks: accumulate rows [r0, r1) over the blocks in scratch (or directly in y).
    const int64_t rows = r1 - r0;
    float* acc = direct ? y.data + r0 * y.sn + p0 : scratch(1, rows * Cfg::kTileP);
    const int64_t ld_acc = direct ? y.sn : Cfg::kTileP;
    int64_t* cur = reinterpret_cast<int64_t*>(scratch(2, 4 * rows + 16));
    int64_t* end = cur + rows;
    std::memcpy(cur, pr.ro + r0, sizeof(int64_t) * static_cast<size_t>(rows));
    for (int64_t kb = 0; kb < nkb; ++kb) {
      const int64_t k_end = std::min(K, (kb + 1) * kblock);
      for (int64_t i = 0; i < rows; ++i) {
        const I* first = pr.a.cols + cur[i];
        const I* last = pr.a.cols + pr.ro[r0 + i + 1];
        end[i] = cur[i] + (std::lower_bound(first, last, static_cast<int64_t>(k_end),
                                            [](I v, int64_t k) { return static_cast<int64_t>(v) < k; }) - first);
      }
      kern.tile(pr.a, cur, end, rows, xt, ldx, width, bias ? bias + r0 : nullptr, kb > 0, stream_w, acc, ld_acc);
      std::swap(cur, end);
    }
    if (!direct) {
      for (int64_t rb = 0; rb < rows; rb += 16) {
        const int64_t rr = std::min<int64_t>(16, rows - rb);
        for (int64_t q = 0; q < width; q += 16) {
          const int64_t cols = std::min<int64_t>(16, width - q);
          float* dst = y.data + (r0 + rb) * y.sn + (p0 + q) * y.sp;
          const float* src = acc + rb * Cfg::kTileP + q;
          if (y.sn == 1) {
            transpose(src, Cfg::kTileP, dst, y.sp, rr, cols);
          } else {
            for (int64_t i = 0; i < rr; ++i)
              for (int64_t j = 0; j < cols; ++j) dst[i * y.sn + j * y.sp] = src[i * Cfg::kTileP + j];
          }
        }
      }
    }
  };

  // One nnz-balanced chunk per thread, the same rows on every call, so that their weights and
  // outputs stay in that thread's L2 (dynamic scheduling of 4 chunks per thread, at 1536x384,
  // 90%, 2 threads: batch 128 188-191 -> 165-171 us, batch 16 35-37 -> 32 us; the larger
  // quick-suite shapes unchanged). Without K blocks or X scans, chunk c's row blocks (times
  // column tiles) are claimed through its Units: thread c works through chunk c, then takes
  // what is left of the others from their ends, so that a thread that runs slower (a VM's vCPUs
  // do, at times) holds the others at the join for about one row block (NOTES.md, stop 33).
  const bool steal = nkb == 1 && !by_columns && !scan_x && nt > 1 && (N / Cfg::kRowBlock + 1) * ptiles < INT32_MAX;
  std::vector<Units> units(steal ? static_cast<size_t>(parts) : 0);
  for (int64_t c = 0; c < parts && steal; ++c) {
    const int64_t rows = bounds[static_cast<size_t>(c + 1)] - bounds[static_cast<size_t>(c)];
    units[static_cast<size_t>(c)].reset(static_cast<uint32_t>((rows + Cfg::kRowBlock - 1) / Cfg::kRowBlock * ptiles));
  }
#pragma omp parallel num_threads(nt) reduction(|| : bad)
  {
    const float* xv = x;
    if constexpr (!std::is_same_v<Pack, std::nullptr_t>) xv = pack(&bad);
    if (steal) {
      const int64_t t = omp_get_thread_num();
      for (int64_t s = 0; s < parts; ++s) {
        const int64_t c = (t + s) % parts;
        const int64_t r0 = bounds[static_cast<size_t>(c)], r1 = bounds[static_cast<size_t>(c + 1)];
        auto run = [&](int64_t u0, int64_t u1) {
          if (ptiles == 1) {
            run_item(xv, r0 + u0 * Cfg::kRowBlock, std::min(r0 + u1 * Cfg::kRowBlock, r1), 0);
            return;
          }
          for (int64_t u = u0; u < u1; ++u) {
            const int64_t rb = r0 + u / ptiles * Cfg::kRowBlock;
            run_item(xv, rb, std::min(rb + Cfg::kRowBlock, r1), u % ptiles);
          }
        };
        if (s == 0) {
          units[static_cast<size_t>(c)].take_front(run);
        } else {
          units[static_cast<size_t>(c)].take_back_halves(run);
        }
      }
    } else {
#pragma omp for schedule(static)
      for (int64_t it = 0; it < items; ++it) {
        const int64_t c = by_columns ? 0 : it / ptiles;
        const int64_t t0 = by_columns ? ptiles * it / groups : it % ptiles;
        const int64_t t1 = by_columns ? ptiles * (it + 1) / groups : t0 + 1;
        if (scan_x) {  // the group's panel, or with row chunks, chunk c's share of the tile's rows
          const int64_t k0 = by_columns ? 0 : K * c / parts, k1 = by_columns ? K : K * (c + 1) / parts;
          const int64_t p0 = t0 * tile_p, p1 = std::min(P, t1 * tile_p);
          bad = any_nonfinite(DenseIn{xv + k0 * ldx + p0, k1 - k0, p1 - p0, ldx, 1}) || bad;
        }
        const int64_t r0 = by_columns ? 0 : bounds[static_cast<size_t>(c)];
        const int64_t r1 = by_columns ? N : bounds[static_cast<size_t>(c + 1)];
        if (r1 <= r0) continue;
        for (int64_t pt = t0; pt < t1; ++pt) run_item(xv, r0, r1, pt);
      }
    }
  }
  return bad;
}

// Sets Y(n, p) = NaN where dense would get NaN from 0 * Inf/NaN (see propagate_nonfinite).
template <typename I, typename T>
void fix_nonfinite(const Problem<I, T>& pr, XView x, YView y) {
  const DenseIn xin{x.data, pr.K, pr.P, x.sk, x.sp};
  const DenseOut yout{y.data, pr.N, pr.P, y.sn, y.sp};
  propagate_nonfinite(xin, yout, [&](int64_t n, const unsigned char* flags) {
    int64_t c = 0;
    for (int64_t j = pr.ro[n]; j < pr.ro[n + 1]; ++j) c += flags[pr.a.cols[j]];
    return c;
  });
}

// X's P columns as float32 rows of K (k contiguous), as the gather and sliced-ELL kernels read
// them: float32 x in place where its k is contiguous, else copied or widened into scratch slot 0.
inline DenseIn x_as_rows(const float* x, int64_t K, int64_t P, int64_t xsk, int64_t xsp, int) {
  if (xsk == 1) return DenseIn{x, K, P, 1, xsp};
  float* buf = scratch(0, P * K + 16);
  for (int64_t p = 0; p < P; ++p)
    for (int64_t k = 0; k < K; ++k) buf[p * K + k] = x[k * xsk + p * xsp];
  return DenseIn{buf, K, P, 1, K};
}
inline DenseIn x_as_rows(const uint16_t* x, int64_t K, int64_t P, int64_t xsk, int64_t xsp, int num_threads) {
  return widen_bf16(DenseInBf16{x, K, P, xsk, xsp}, /*k_contiguous=*/true, K, scratch(0, P * K + 16), num_threads);
}

// The driver: X as float32 (xf, strides) when S == float, else bfloat16 bits converted on the way.
template <typename I, typename T, typename S>
void run_csr(const Problem<I, T>& pr, const S* x, int64_t xsk, int64_t xsp, const float* bias,
             YView y, int num_threads) {
  const int64_t K = pr.K, P = pr.P;
  const int nt = pr.ro[pr.N] * P < Cfg::kSerialWork ? 1 : num_threads;
  const Isa isa = vector_isa();
  const CsrKernels<I, T> kern = csr_kernels<I, T>(isa);
  const TransposeFn transpose = pick_transpose(isa);
  constexpr bool kFloat = std::is_same_v<S, float>;

  if (P < gather_max_p(isa) && (xsk == 1 || !kFloat)) {
    const DenseIn xr = x_as_rows(x, K, P, xsk, xsp, num_threads);
    run_gather(pr, kern, xr.data, xr.stride_p, bias, y, nt);
    if (any_nonfinite(xr)) fix_nonfinite(pr, XView{xr.data, 1, xr.stride_p}, y);
    return;
  }

  const float* xf;
  int64_t ldx;
  bool bad = false;
  // X with p contiguous is read in place when its rows are aligned, or when they are used too few
  // times for an aligned copy to pay (see CsrCpuConfig::kInPlaceReuse).
  const bool in_place = kFloat && xsp == 1 &&
                        ((xsk % 16 == 0 && reinterpret_cast<uintptr_t>(x) % 64 == 0) ||
                         pr.ro[pr.N] < Cfg::kInPlaceReuse * K);
  if (in_place) {  // run_tile looks for NaN/Inf
    xf = reinterpret_cast<const float*>(x), ldx = xsk;
  } else if (nt > 1 && K * P <= Cfg::kPrivatePack) {
    // A small X packed by every thread into its own scratch, in the kernels' parallel region.
    // Packed once by the calling thread, its lines moved to the other core on every call:
    // 1536x384 90% batch 16 on 2 threads took 51 us a call that way, against 35 us for an x
    // already in the packed layout (read in place), in one process (NOTES.md, stop 31).
    ldx = (P + 15) / 16 * 16;
    auto pack = [&](bool* bad_x) {
      float* buf = scratch(0, K * ldx);
      *bad_x = pack_panels(x, K, P, xsk, xsp, ldx, buf, 1, isa) || *bad_x;
      return static_cast<const float*>(buf);
    };
    bad = run_tile(pr, kern, transpose, nullptr, ldx, bias, y, nt, false, pack);
    if (bad) fix_nonfinite(pr, XView{pack(&bad), ldx, 1}, y);
    return;
  } else {
    ldx = (P + 15) / 16 * 16;
    float* buf = scratch(0, K * ldx);
    bad = pack_panels(x, K, P, xsk, xsp, ldx, buf, nt, isa);
    xf = buf;
  }
  bad = run_tile(pr, kern, transpose, xf, ldx, bias, y, nt, in_place) || bad;
  if (bad) fix_nonfinite(pr, XView{xf, ldx, 1}, y);
}

#ifdef PYHWP_X86_KERNELS
// Sliced-ELL path (csr_sell.h): P <= kSellMaxP columns of finite x with contiguous rows (column
// p at x + p*ldx), W's slices split into slot-balanced runs, one per thread, 4 columns per pass.
void run_sell(const CsrSell& s, const float* x, int64_t ldx, int64_t P, const float* bias, YView y,
              int num_threads) {
  const CsrSellFn kern = csr_sell_kernel_avx512();
  const int nt = s.slots * 16 * P < Cfg::kSerialWork ? 1 : num_threads;
  std::vector<int64_t> bounds;
  balanced_runs(s.slice_slots, s.slices, 1, nt, &bounds);
#pragma omp parallel for num_threads(nt) schedule(static, 1)
  for (int64_t c = 0; c < nt; ++c) {
    const int64_t s0 = bounds[static_cast<size_t>(c)], s1 = bounds[static_cast<size_t>(c + 1)];
    for (int64_t p = 0; p < P && s1 > s0; p += kCsrSellMaxNp) {
      kern(s, s0, s1, x + p * ldx, ldx, std::min(kCsrSellMaxNp, P - p), bias, y.data + p * y.sp, y.sn, y.sp);
    }
  }
}
#endif

// The sliced-ELL path of both entry points, where W has the copy (M: CsrMatrix or CsrMatrixBf16,
// the copy's values of the same type), P <= kSellMaxP, the CPU has AVX-512 and x is finite (with
// NaN/Inf the CSR paths propagate them as dense does); false where it does not apply.
template <typename M, typename S>
bool try_sell(const M& w, const S* x, int64_t xsk, int64_t xsp, int64_t P, const float* bias, YView y,
              int num_threads) {
#ifdef PYHWP_X86_KERNELS
  if (!w.sell || P > Cfg::kSellMaxP || vector_isa() < Isa::kAvx512) return false;
  const CsrSell s = csr_sell_view(w.sell, w.rows, w.cols, sizeof(*w.values) == 4 ? 4 : 2);
  const DenseIn xr = x_as_rows(x, w.cols, P, xsk, xsp, num_threads);
  if (any_nonfinite(xr)) return false;
  run_sell(s, xr.data, xr.stride_p, P, bias, y, num_threads);
  return true;
#else
  (void)w, (void)x, (void)xsk, (void)xsp, (void)P, (void)bias, (void)y, (void)num_threads;
  return false;
#endif
}

template <typename M>
void check_sizes(const M& w, int64_t x_rows, int64_t x_cols, int64_t y_rows, int64_t y_cols, int num_threads,
                 const char* op) {
  PYHWP_CHECK(x_rows == w.cols, op, ": x has ", x_rows, " rows, W has ", w.cols, " columns");
  PYHWP_CHECK(y_rows == w.rows && y_cols == x_cols, op, ": y is ", y_rows, "x", y_cols, ", expected ",
              w.rows, "x", x_cols);
  PYHWP_CHECK(num_threads >= 1, op, ": num_threads must be >= 1");
  PYHWP_CHECK(w.row_offsets && (w.nnz == 0 || ((w.col_indices || w.col_indices16) && w.values)),
              op, ": null CSR array");
  PYHWP_CHECK(w.row_offsets[w.rows] == w.nnz, op, ": row_offsets[-1] != nnz");
  PYHWP_CHECK(!w.col_indices16 || w.cols <= 65536, op, ": 16-bit column indices need cols <= 65536");
}

// Calls fn(problem) with the index width the matrix offers (16-bit preferred).
template <typename T, typename M, typename Fn>
void with_indices(const M& w, const T* values, Fn fn) {
  if (w.col_indices16) {
    fn(Problem<uint16_t, T>{{w.col_indices16, values}, w.row_offsets, w.rows, w.cols, 0, w.resident});
  } else {
    fn(Problem<int32_t, T>{{w.col_indices, values}, w.row_offsets, w.rows, w.cols, 0, w.resident});
  }
}

}  // namespace

void csr_matmul(const CsrMatrix& w, const DenseIn& x, const float* bias, const DenseOut& y,
                int num_threads) {
  check_sizes(w, x.rows, x.cols, y.rows, y.cols, num_threads, "csr_matmul");
  if (w.rows == 0 || x.cols == 0) return;
  PYHWP_CHECK(x.data && y.data, "csr_matmul: null x or y");
  if (try_sell(w, x.data, x.stride_k, x.stride_p, x.cols, bias, YView{y.data, y.stride_n, y.stride_p}, num_threads)) {
    return;
  }
  with_indices(w, w.values, [&](auto pr) {
    pr.P = x.cols;
    run_csr(pr, x.data, x.stride_k, x.stride_p, bias, YView{y.data, y.stride_n, y.stride_p}, num_threads);
  });
}

void csr_matmul_bf16(const CsrMatrixBf16& w, const DenseInBf16& x, const uint16_t* bias,
                     const DenseOutBf16& y, int num_threads) {
  check_sizes(w, x.rows, x.cols, y.rows, y.cols, num_threads, "csr_matmul_bf16");
  const int64_t N = w.rows, P = x.cols;
  if (N == 0 || P == 0) return;
  PYHWP_CHECK(x.data && y.data, "csr_matmul_bf16: null x or y");
  // float32 bias and output scratch (slot 3: the driver uses 0 for X and 1-2 in workers).
  float* yf = scratch(3, N * P + N + 16);
  const float* bf = widen_bf16(bias, N, yf + N * P);
  // Y scratch n-contiguous (P x N) for small P, like a linear output (and what the sliced-ELL
  // kernel writes whole vectors of); p-contiguous otherwise.
  const bool small = P < gather_max_p(vector_isa()) || (w.sell && P <= Cfg::kSellMaxP);
  const YView yv = small ? YView{yf, 1, N} : YView{yf, P, 1};
  if (!try_sell(w, x.data, x.stride_k, x.stride_p, P, bf, yv, num_threads)) {
    with_indices(w, w.values, [&](auto pr) {
      pr.P = P;
      run_csr(pr, x.data, x.stride_k, x.stride_p, bf, yv, num_threads);
    });
  }
  round_to_bf16(DenseOut{yf, N, P, yv.sn, yv.sp}, y, num_threads);
}

}  // namespace pyhwp
