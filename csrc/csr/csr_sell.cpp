// Packing of the sliced-ELL copy of a CSR matrix (layout in csr_sell.h).
#include "csr/csr_sell.h"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

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

// Calls fn(indices) with W's column indices (the 16-bit copy where there is one, as the kernels);
// M is CsrMatrix or CsrMatrixBf16.
template <typename M, typename Fn>
void with_columns(const M& w, Fn fn) {
  if (w.col_indices16) {
    fn(w.col_indices16);
  } else {
    fn(w.col_indices);
  }
}

// One slice's shape, in one pass over its rows' indices: count[r * windows + win] stored weights of
// row r in window win, and slots[win], the largest of them. Refuses what csr_validate would (an
// index out of range or not increasing), on which the packing's writes depend.
template <typename M, typename I>
void slice_counts(const M& w, const I* cols, int64_t s, int64_t windows, int32_t* count, int64_t* slots) {
  std::fill(count, count + kLanes * windows, 0);
  const int64_t rows = std::min(kLanes, w.rows - s * kLanes);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = s * kLanes + r;
    int64_t prev = -1;
    for (int64_t j = w.row_offsets[n]; j < w.row_offsets[n + 1]; ++j) {
      const int64_t c = cols[j];
      PYHWP_CHECK(c > prev && c < w.cols, "csr_sell: column index ", c, " at position ", j, " of row ", n,
                  " is out of range or not increasing; the CSR matrix is not valid (csr_validate)");
      ++count[r * windows + c / kWindow];
      prev = c;
    }
  }
  for (int64_t win = 0; win < windows; ++win) {
    int32_t most = 0;
    for (int64_t r = 0; r < kLanes; ++r) most = std::max(most, count[r * windows + win]);
    slots[win] = most;
  }
}

// fn(s, slots) for every slice s in order (slots as slice_counts gives).
template <typename M, typename Fn>
void for_each_slice(const M& w, Fn fn) {
  const int64_t slices = (w.rows + kLanes - 1) / kLanes, windows = (w.cols + kWindow - 1) / kWindow;
  std::vector<int32_t> count(static_cast<size_t>(kLanes * windows));
  std::vector<int64_t> slots(static_cast<size_t>(windows));
  with_columns(w, [&](const auto* cols) {
    for (int64_t s = 0; s < slices; ++s) {
      slice_counts(w, cols, s, windows, count.data(), slots.data());
      fn(s, slots.data());
    }
  });
}

template <typename M>
int64_t count_slots(const M& w) {
  const int64_t windows = (w.cols + kWindow - 1) / kWindow;
  int64_t total = 0;
  for_each_slice(w, [&](int64_t, const int64_t* slots) {
    for (int64_t win = 0; win < windows; ++win) total += slots[win];
  });
  return total;
}

// One histogram pass writes the slot counts and the slices' slot offsets, whose places do not
// depend on the total; a second pass over the indices places every stored weight.
template <typename M>
void pack(const M& w, void* blob) {
  using T = std::remove_cv_t<std::remove_pointer_t<decltype(w.values)>>;
  PYHWP_CHECK(reinterpret_cast<uintptr_t>(blob) % 64 == 0, "csr_sell_pack: the blob is not 64-byte aligned");
  CsrSellHeader h{};
  h.magic = kCsrSellMagic;
  h.rows = w.rows, h.cols = w.cols;
  h.slices = (w.rows + kLanes - 1) / kLanes, h.windows = (w.cols + kWindow - 1) / kWindow;
  h.value_bytes = sizeof(T);
  char* base = static_cast<char*>(blob);
  Sections o = sections(h.slices, h.windows, 0, h.value_bytes);  // up to the values: slots not needed
  std::memset(base, 0, static_cast<size_t>(o.values));
  auto* slice_slots = reinterpret_cast<int64_t*>(base + o.slice_slots);
  auto* counts = reinterpret_cast<uint8_t*>(base + o.counts);
  int64_t t = 0;
  for_each_slice(w, [&](int64_t s, const int64_t* slots) {
    slice_slots[s] = t;
    for (int64_t win = 0; win < h.windows; ++win) {
      counts[s * h.windows + win] = static_cast<uint8_t>(slots[win]);  // <= 32: columns increase
      t += slots[win];
    }
  });
  slice_slots[h.slices] = h.slots = t;
  std::memcpy(base, &h, sizeof h);
  o = sections(h.slices, h.windows, h.slots, h.value_bytes);
  std::memset(base + o.values, 0, static_cast<size_t>(o.end - o.values));
  auto* values = reinterpret_cast<T*>(base + o.values);
  auto* lanes = reinterpret_cast<uint8_t*>(base + o.lanes);
  std::vector<int64_t> first(static_cast<size_t>(h.windows));  // a slice's first slot of each window
  with_columns(w, [&](const auto* cols) {
    for (int64_t s = 0; s < h.slices; ++s) {
      for (int64_t win = 0, f = slice_slots[s]; win < h.windows; ++win) {
        first[static_cast<size_t>(win)] = f;
        f += counts[s * h.windows + win];
      }
      // A row's columns increase, so its weights of each window are consecutive: the i-th of them
      // takes slot first[win] + i, lane r.
      const int64_t rows = std::min(kLanes, w.rows - s * kLanes);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t n = s * kLanes + r;
        int64_t win = -1, slot = 0;
        for (int64_t j = w.row_offsets[n]; j < w.row_offsets[n + 1]; ++j) {
          const int64_t c = cols[j];
          if (c / kWindow != win) win = c / kWindow, slot = first[static_cast<size_t>(win)];
          values[slot * kLanes + r] = w.values[j];
          lanes[slot * kLanes + r] = static_cast<uint8_t>(c - win * kWindow);
          ++slot;
        }
      }
    }
  });
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
