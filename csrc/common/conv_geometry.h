// The geometry of a stride-1 conv2d as an implicit GEMM, shared by the CPU drivers
// (common/implicit_conv.h) and the CUDA CSR conv.
#pragma once
#include <cstdint>

namespace pyhwp {

// A stride-1 conv of the contiguous (images, C, h, w) input x, zero-padded by pt rows on top and
// pl columns on the left (the bottom and right padding follow from ho, wo), with a kh x kw kernel
// dilated by (dh, dw). As a GEMM, W is the (out, C*kh*kw) matrix of the conv weight (column
// j = (c*kh + r)*kw + s). The drivers copy each image's channels into padded planes, one every
// `plane` floats; an input that is already in that layout is read in place. In the plain layout,
// with p = a*wp + b, column j of W reads X at the offset c*plane + r*dh*wp + s*dw from pixel p:
// every column is a contiguous row of X, and the matmul tile kernels run on it unchanged; the
// wp - wo wrapped columns of each output row are computed and dropped (the 2:4 driver may also
// take the shifted layout: PaddedPlanes in common/implicit_conv.h). Output:
// y[((i*out + n)*ho + a)*wo + b] = bias[n] + sum_j W(n, j) * padded_x[i][c][a + r*dh][b + s*dw].
struct ConvGeometry {
  int64_t images, channels, h, w, pt, pl, kh, kw, dh, dw, ho, wo;
};

}  // namespace pyhwp
