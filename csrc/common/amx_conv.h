// bfloat16 conv2d (groups 1, stride 1 or 2 along the width, any along the height) on the AMX tile
// unit as an implicit GEMM, from a weight's dense values (any pattern; all-zero tiles skipped).
//
// Roles (C += A B, TDPBF16PS): A is 16 output pixels by 32 input channels at one kernel tap, B
// the weight's 32 input channels by 16 output channels at that tap, C a 16 (pixel) x 16 (output
// channel) float32 block, transposed into the NCHW output when stored. Nothing like im2col is
// built: the input is copied once into a padded pixel-major layout (each pixel's channels, C
// rounded up to 32, contiguous), where A for tap (r, s) is 16 consecutive pixels from a fixed
// offset: 16 aligned 64-byte rows, whatever the offset. A strided conv's input is copied as
// stride phases (the padded pixels at one row and column offset modulo the stride), in which
// every tap is again a stride-1 window. Pixels run over the padded (phase) width (p = a*wq + b,
// as in common/conv_geometry.h); the wq - wo columns past each output row are computed and
// dropped. A work item is two blocks of 16 pixels by two tiles of 16 output channels.
//
// The weight arrives as B tiles in the unit's pair layout (built by the caller from the dense
// weight: pyhwp/ops/amx_conv.py): tile (o, t, c) for output-channel tile o (zeros past `out`),
// tap t = r*kw + s and channel block c (zeros past C) at tiles + ((o*taps + t)*cblocks + c)*512,
// its row q holding, for output channels 16 o .. 16 o + 15 in turn, input channels 32 c + 2 q and
// 32 c + 2 q + 1. nonzero[(o*taps + t)*cblocks + c] is 0 when the tile's values are all zero.
// (Those tiles follow the channels at one tap; the masked format's 16x16 tiles run along the
// flattened (channel, tap) columns instead, so they leave such tiles all zero only when the
// pruning zeroed whole channel blocks.)
//
// Products are exact and sums float32 in the unit's order, plus the float32 bias, rounded once
// to bfloat16; like every AMX bfloat16 product it reads subnormal inputs as zero (DAZ).
#pragma once
#include <cstdint>

#include "common/conv_geometry.h"

namespace pyhwp {

struct AmxConvWeight {
  int64_t out = 0;
  const uint16_t* tiles = nullptr;
  const uint8_t* nonzero = nullptr;
};

enum class AmxConvStatus : int {
  kDone = 0,         // y written
  kNonfinite = 1,    // x holds a NaN/Inf (skipped zero tiles would drop 0 * Inf = NaN): y unspecified
  kUnavailable = 2,  // no usable tile unit here (CPU, OS permission, build or ISA cap): y untouched
};

// y (images, out, ho, wo) bfloat16 = conv(x (images, C, h, w) bfloat16) + bias (out bfloat16, or
// nullptr), both contiguous, or both channels_last (memory (images, h, w, C) and (images, ho, wo,
// out)); g as in ConvGeometry: output pixel (a, b) reads padded input (a sh + r dh, b sw + s dw),
// ho and wo as the caller computed them. sw above 2 is not served (kUnavailable). Images run in chunks whose copy of the input stays within 64 MiB. Up to
// num_threads threads.
#ifdef PYHWP_AMX_KERNELS
AmxConvStatus amx_conv2d_bf16(const AmxConvWeight& w, const ConvGeometry& g, bool channels_last, const uint16_t* x,
                              const uint16_t* bias, uint16_t* y, int num_threads);
#else
inline AmxConvStatus amx_conv2d_bf16(const AmxConvWeight&, const ConvGeometry&, bool, const uint16_t*,
                                     const uint16_t*, uint16_t*, int) {
  return AmxConvStatus::kUnavailable;  // built without the AMX kernels
}
#endif

}  // namespace pyhwp
