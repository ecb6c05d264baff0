// The geometry of a conv2d as an implicit GEMM, shared by the CPU drivers
// (common/implicit_conv.h) and the CUDA CSR conv.
#pragma once
#include <cstdint>

namespace pyhwp {

// A conv of the contiguous (images, C, h, w) input x with stride (sh, sw), zero-padded by pt rows
// on top and pl columns on the left (the bottom and right padding follow from ho, wo), with a kh x
// kw kernel dilated by (dh, dw). As a GEMM, W is the (out, C*kh*kw) matrix of the conv weight
// (column j = (c*kh + r)*kw + s). The drivers copy each image's channels into padded planes, one
// every `plane` floats; an input that is already in that layout is read in place. In the plain
// layout, with p = a*wp + b, column j of W reads X at the offset c*plane + r*dh*wp + s*dw from
// pixel p: every column is a contiguous row of X, and the matmul tile kernels run on it unchanged;
// the wp - wo wrapped columns of each output row are computed and dropped (the 2:4 driver may also
// take the shifted layout: PaddedPlanes in common/implicit_conv.h). A strided conv is a stride-1
// one over stride phases: channel c is copied as sh*sw planes, phase (u, v) holding the padded
// pixels (i*sh + u, j*sw + v), and column j reads phase ((r*dh) % sh, (s*dw) % sw) of channel c at
// ((r*dh) / sh)*wp + (s*dw) / sw. Output:
// y[((i*out + n)*ho + a)*wo + b] = bias[n] + sum_j W(n, j) * padded_x[i][c][a*sh + r*dh][b*sw + s*dw].
struct ConvGeometry {
  int64_t images, channels, h, w, pt, pl, kh, kw, dh, dw, ho, wo;
  int64_t sh = 1, sw = 1;
};

}  // namespace pyhwp
