// Packing of the sliced-ELL copy of a CSR matrix (layout in csr_sell.h).
#include "csr/csr_sell.h"

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "common/checks.h"

namespace pyhwp {

namespace {

constexpr int64_t kLanes = 16, kWindow = 32;

int64_t round64(int64_t bytes) { return (bytes + 63) / 64 * 64; }

// Section offsets of a blob with the given sizes, from its start.
struct Sections {
  int64_t slice_slots, counts, values, lanes, end;
};
Sections sections(int64_t slices, int64_t windows, int64_t slots, int64_t value_bytes) {
  Sections o;
  o.slice_slots = 64;
  o.counts = o.slice_slots + round64(8 * (slices + 1));
  o.values = o.counts + round64(slices * windows);
  o.lanes = o.values + round64(value_bytes * kLanes * slots);
  o.end = o.lanes + round64(kLanes * slots);
  return o;
}

// Column index j of W (16-bit copy preferred, as the kernels); M is CsrMatrix or CsrMatrixBf16.
template <typename M>
inline int64_t column(const M& w, int64_t j) {
  return w.col_indices16 ? w.col_indices16[j] : w.col_indices[j];
}

// For every slice and window in order: fn(slice, window, first, count, slots), where row r of
// the slice stores count[r] weights in the window from position first[r] on, and slots is the
// largest count.
template <typename M, typename Fn>
void for_each_window(const M& w, Fn fn) {
  const int64_t slices = (w.rows + kLanes - 1) / kLanes, windows = (w.cols + kWindow - 1) / kWindow;
  int64_t pos[kLanes], count[kLanes];
  for (int64_t s = 0; s < slices; ++s) {
    const int64_t rows = std::min(kLanes, w.rows - s * kLanes);
    for (int64_t r = 0; r < kLanes; ++r) pos[r] = r < rows ? w.row_offsets[s * kLanes + r] : 0;
    for (int64_t win = 0; win < windows; ++win) {
      int64_t slots = 0;
      for (int64_t r = 0; r < kLanes; ++r) {
        int64_t j = pos[r];
        if (r < rows) {
          const int64_t end = w.row_offsets[s * kLanes + r + 1];
          while (j < end && column(w, j) < (win + 1) * kWindow) ++j;
        }
        count[r] = j - pos[r];
        slots = std::max(slots, count[r]);
      }
      // Strictly increasing columns put at most 32 of a row in a window (csr_validate).
      PYHWP_CHECK(slots <= kWindow, "csr_sell: ", slots, " stored weights of one row in a 32-column window; "
                  "the CSR matrix is not valid (csr_validate)");
      fn(s, win, pos, count, slots);
      for (int64_t r = 0; r < kLanes; ++r) pos[r] += count[r];
    }
  }
}

template <typename M>
int64_t count_slots(const M& w) {
  int64_t total = 0;
  for_each_window(w, [&](int64_t, int64_t, const int64_t*, const int64_t*, int64_t slots) { total += slots; });
  return total;
}

template <typename M>
void pack(const M& w, void* blob) {
  using T = std::remove_cv_t<std::remove_pointer_t<decltype(w.values)>>;
  PYHWP_CHECK(reinterpret_cast<uintptr_t>(blob) % 64 == 0, "csr_sell_pack: the blob is not 64-byte aligned");
  CsrSellHeader h{};
  h.magic = kCsrSellMagic;
  h.rows = w.rows, h.cols = w.cols;
  h.slices = (w.rows + kLanes - 1) / kLanes, h.windows = (w.cols + kWindow - 1) / kWindow;
  h.slots = count_slots(w);
  h.value_bytes = sizeof(T);
  char* base = static_cast<char*>(blob);
  const Sections o = sections(h.slices, h.windows, h.slots, h.value_bytes);
  std::memset(base, 0, static_cast<size_t>(o.end));
  std::memcpy(base, &h, sizeof h);
  auto* slice_slots = reinterpret_cast<int64_t*>(base + o.slice_slots);
  auto* counts = reinterpret_cast<uint8_t*>(base + o.counts);
  auto* values = reinterpret_cast<T*>(base + o.values);
  auto* lanes = reinterpret_cast<uint8_t*>(base + o.lanes);
  int64_t t = 0;
  for_each_window(w, [&](int64_t s, int64_t win, const int64_t* first, const int64_t* count, int64_t slots) {
    if (win == 0) slice_slots[s] = t;
    counts[s * h.windows + win] = static_cast<uint8_t>(slots);
    for (int64_t r = 0; r < kLanes; ++r) {
      for (int64_t i = 0; i < count[r]; ++i) {
        values[(t + i) * kLanes + r] = w.values[first[r] + i];
        lanes[(t + i) * kLanes + r] = static_cast<uint8_t>(column(w, first[r] + i) - win * kWindow);
      }
    }
    t += slots;
  });
  slice_slots[h.slices] = t;
}

}  // namespace

int64_t csr_sell_bytes(const CsrMatrix& w, int64_t value_bytes) {
  PYHWP_CHECK(value_bytes == 4 || value_bytes == 2, "csr_sell_bytes: values of 4 or 2 bytes, not ", value_bytes);
  const int64_t slices = (w.rows + kLanes - 1) / kLanes, windows = (w.cols + kWindow - 1) / kWindow;
  return sections(slices, windows, count_slots(w), value_bytes).end;
}

void csr_sell_pack(const CsrMatrix& w, void* blob) { pack(w, blob); }
void csr_sell_pack(const CsrMatrixBf16& w, void* blob) { pack(w, blob); }

CsrSell csr_sell_view(const void* blob, int64_t rows, int64_t cols, int64_t value_bytes) {
  PYHWP_CHECK(reinterpret_cast<uintptr_t>(blob) % 64 == 0, "CSR sell copy: not 64-byte aligned");
  CsrSellHeader h;
  std::memcpy(&h, blob, sizeof h);
  PYHWP_CHECK(h.magic == kCsrSellMagic, "CSR sell copy: not written by csr_sell_pack");
  PYHWP_CHECK(h.rows == rows && h.cols == cols, "CSR sell copy: packed for ", h.rows, "x", h.cols,
              ", the matrix is ", rows, "x", cols);
  PYHWP_CHECK(h.value_bytes == value_bytes, "CSR sell copy: packed with ", h.value_bytes,
              "-byte values, the matrix has ", value_bytes, "-byte values");
  const char* base = static_cast<const char*>(blob);
  const Sections o = sections(h.slices, h.windows, h.slots, h.value_bytes);
  return CsrSell{h.rows, h.cols, h.slices, h.windows, h.slots,
                 reinterpret_cast<const int64_t*>(base + o.slice_slots),
                 reinterpret_cast<const uint8_t*>(base + o.counts),
                 base + o.values, h.value_bytes == 2,
                 reinterpret_cast<const uint8_t*>(base + o.lanes)};
}

}  // namespace pyhwp
