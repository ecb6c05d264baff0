// Where a tile kernel finds row k of X (its columns from the view's start on): the row policies
// the 2:4 and masked micro-kernels are templated on, so that the matmul and the implicit-GEMM conv
// run the same kernels.
#pragma once
#include <cstdint>

namespace pyhwp {

// PanelRows: a packed panel, rows ld floats apart (the matmul). OffsetRows: an implicit-GEMM
// conv's shifted windows of a padded image, row k at x + offsets[k] (common/implicit_conv.h).
// chunk(c) is the view from input 32c on (a 2:4 metadata word), columns(q) the view from column q
// on; span(k1, k2) the bytes from row k1 on that the 2:4 kernel prefetches into L2 before K block
// [k1, k2): a panel's next block, which a long weight streaming through L2 would otherwise have
// evicted. None for the conv, whose windows are the thread's own padded planes, already in its L2
// (and whose blocks span the shifted copies).
struct PanelRows {
  const float* x;
  int64_t ld;
  const float* row(int64_t k) const { return x + k * ld; }
  PanelRows chunk(int64_t c) const { return {x + 32 * c * ld, ld}; }
  PanelRows columns(int64_t q) const { return {x + q, ld}; }
  int64_t span(int64_t k1, int64_t k2) const { return (k2 - k1) * ld * 4; }
};
struct OffsetRows {
  const float* x;
  const int32_t* offsets;
  const float* row(int64_t k) const { return x + offsets[k]; }
  OffsetRows chunk(int64_t c) const { return {x, offsets + 32 * c}; }
  OffsetRows columns(int64_t q) const { return {x + q, offsets}; }
  int64_t span(int64_t, int64_t) const { return 0; }
};

// A packed block whose rows are a compile-time L floats apart (the masked kernels' blocks: mr
// columns, or 16 nv for the wide kernel), so the kernel's addresses stay constant offsets.
template <int L>
struct PackedRows {
  const float* x;
  const float* row(int64_t k) const { return x + k * L; }
};

}  // namespace pyhwp
