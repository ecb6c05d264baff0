// pyhwp._C: the only file that includes pybind11. Thin wrappers over the torch-free kernels:
// tensors arrive as raw addresses (tensor.data_ptr()) plus sizes and strides, already validated
// by the Python layer; the kernels re-check sizes and throw std::invalid_argument -> ValueError.
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <string>

#include "common/amx_conv.h"
#include "common/checks.h"
#include "common/cpu_features.h"
#include "common/dense.h"
#include "csr/csr_matmul.h"
#include "csr/csr_sell.h"
#include "masked/masked_matmul.h"
#include "sparse24/sparse24_matmul.h"
#ifdef PYHWP_WITH_CUDA
#include "common/dense_cuda.h"
#include "common/dtype.h"
#include "csr/csr_cuda.h"
#include "masked/masked_matmul_cuda.h"
#include "sparse24/sparse24_matmul_cuda.h"
#endif

namespace py = pybind11;
using pyhwp::CsrMatrix;
using pyhwp::DenseIn;
using pyhwp::DenseOut;
using pyhwp::MaskedMatrix;
using Addr = std::uintptr_t;

namespace {

template <typename T>
T* ptr(Addr a) {
  return reinterpret_cast<T*>(a);
}

CsrMatrix make_csr(int64_t rows, int64_t cols, int64_t nnz, Addr row_offsets, Addr col_indices,
                   Addr values, Addr col_indices16 = 0) {
  return CsrMatrix{rows, cols, nnz, ptr<const int64_t>(row_offsets),
                   ptr<const int32_t>(col_indices), ptr<const float>(values),
                   ptr<const uint16_t>(col_indices16)};
}

MaskedMatrix make_masked(int64_t rows, int64_t cols, int64_t ntiles, Addr tile_ptr, Addr tile_idx,
                         Addr values) {
  return MaskedMatrix{rows, cols, ntiles, ptr<const int64_t>(tile_ptr), ptr<const int32_t>(tile_idx),
                      ptr<const float>(values)};
}

py::dict build_info() {
  py::dict d;
  d["compiler"] = PYHWP_COMPILER;
#ifdef _OPENMP
  d["openmp"] = _OPENMP;
#endif
  d["omp_max_threads"] = omp_get_max_threads();
  // CPU kernel variants compiled in, most portable first (set_isa_cap's names).
  py::list isas;
  for (int i = 0; i <= static_cast<int>(pyhwp::best_compiled_isa()); ++i) {
    isas.append(pyhwp::isa_name(static_cast<pyhwp::Isa>(i)));
  }
  d["cpu_kernels"] = isas;
#ifdef PYHWP_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = PYHWP_CUDA_ARCHS;
  d["cuda_version"] = PYHWP_CUDA_VERSION;
#else
  d["cuda"] = false;
  d["cuda_archs"] = "";
  d["cuda_version"] = "";
#endif
#ifdef __SANITIZE_ADDRESS__
  d["sanitize"] = true;
#else
  d["sanitize"] = false;
#endif
  return d;
}

py::dict cpu_features() {
  const auto& f = pyhwp::cpu_features();
  py::dict d;
  d["avx2"] = f.avx2;
  d["avx512"] = f.avx512;
  d["avx512_bf16"] = f.avx512_bf16;
  d["avx512_vbmi2"] = f.avx512_vbmi2;
  d["amx_bf16"] = f.amx_bf16;
  d["amx"] = f.amx;  // usable: the CPU has it and the OS granted this process the tile state
  d["slow_gathers"] = f.slow_gathers;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyhwp compiled kernels (torch-free; pointers are passed as integers)";
  m.def("build_info", &build_info, "Compiler, OpenMP and CUDA facts of this build");
  m.def("cpu_features", &cpu_features, "ISA extensions the running CPU supports");
  m.def("active_isa", [] { return std::string(pyhwp::isa_name(pyhwp::active_isa())); },
        "ISA the CPU kernels use now");
  m.def(
      "set_isa_cap",
      [](const std::string& name) {
        return std::string(pyhwp::isa_name(pyhwp::set_isa_cap(pyhwp::isa_from_name(name))));
      },
      py::arg("isa"),
      "Cap the kernels' ISA ('scalar', 'avx2', 'avx512', 'avx512_bf16', 'amx'); returns the one in use");
  m.def("set_slow_gathers", &pyhwp::set_slow_gathers, py::arg("mode"),
        "Take gathers as slow (1) or fast (0) in the kernels' choices, or as the CPU's vendor says "
        "(-1, the default); returns the previous mode");

  m.def(
      "csr_validate",
      [](int64_t rows, int64_t cols, int64_t nnz, Addr row_offsets, Addr col_indices, Addr values,
         Addr col_indices16) {
        pyhwp::csr_validate(make_csr(rows, cols, nnz, row_offsets, col_indices, values, col_indices16));
      },
      py::arg("rows"), py::arg("cols"), py::arg("nnz"), py::arg("row_offsets"),
      py::arg("col_indices"), py::arg("values"), py::arg("col_indices16") = 0,
      py::call_guard<py::gil_scoped_release>(),
      "Check CSR invariants (host arrays: int64 offsets, int32 indices, float32 values; optional "
      "uint16 copy of the indices, address 0 for none)");

  m.def(
      "csr_matmul",
      [](int64_t rows, int64_t cols, int64_t nnz, Addr row_offsets, Addr col_indices, Addr values,
         Addr x, int64_t p, int64_t x_stride_k, int64_t x_stride_p, Addr bias, Addr y,
         int64_t y_stride_n, int64_t y_stride_p, int num_threads, Addr col_indices16, Addr sell,
         bool resident) {
        CsrMatrix w = make_csr(rows, cols, nnz, row_offsets, col_indices, values, col_indices16);
        w.sell = ptr<const void>(sell);
        w.resident = resident;
        const DenseIn xin{ptr<const float>(x), cols, p, x_stride_k, x_stride_p};
        const DenseOut yout{ptr<float>(y), rows, p, y_stride_n, y_stride_p};
        pyhwp::csr_matmul(w, xin, ptr<const float>(bias), yout, num_threads);
      },
      py::arg("rows"), py::arg("cols"), py::arg("nnz"), py::arg("row_offsets"),
      py::arg("col_indices"), py::arg("values"), py::arg("x"), py::arg("p"),
      py::arg("x_stride_k"), py::arg("x_stride_p"), py::arg("bias"), py::arg("y"),
      py::arg("y_stride_n"), py::arg("y_stride_p"), py::arg("num_threads"),
      py::arg("col_indices16") = 0, py::arg("sell") = 0, py::arg("resident") = false,
      py::call_guard<py::gil_scoped_release>(),
      "Y (rows x p) = W X + bias with W CSR (rows x cols) and X (cols x p), host float32; "
      "element strides for X (k, p) and Y (n, p); bias address 0 for none; col_indices16: "
      "optional uint16 copy of the indices (cols <= 65536) that the kernels then read; sell: "
      "optional sliced-ELL copy (csr_sell_pack) read at small batches on AVX-512 CPUs; resident: "
      "W's arrays are expected in cache (no software prefetch of them; same results)");

  m.attr("csr_sell_max_batch") = pyhwp::CsrCpuConfig::kSellMaxP;  // x rows up to which the copy is read
  m.def(
      "csr_sell_bytes",
      [](int64_t rows, int64_t cols, int64_t nnz, Addr row_offsets, Addr col_indices, Addr col_indices16,
         bool bf16) {
        return pyhwp::csr_sell_bytes(make_csr(rows, cols, nnz, row_offsets, col_indices, 0, col_indices16),
                                     bf16 ? 2 : 4);
      },
      py::arg("rows"), py::arg("cols"), py::arg("nnz"), py::arg("row_offsets"), py::arg("col_indices"),
      py::arg("col_indices16") = 0, py::arg("bf16") = false, py::call_guard<py::gil_scoped_release>(),
      "Bytes of the sliced-ELL copy of a validated CSR matrix (csrc/csr/csr_sell.h) with float32 or "
      "bfloat16 values");
  m.def(
      "csr_sell_pack",
      [](int64_t rows, int64_t cols, int64_t nnz, Addr row_offsets, Addr col_indices, Addr values,
         Addr col_indices16, Addr blob, bool bf16) {
        if (bf16) {
          pyhwp::csr_sell_pack(pyhwp::CsrMatrixBf16{rows, cols, nnz, ptr<const int64_t>(row_offsets),
                                                    ptr<const int32_t>(col_indices), ptr<const uint16_t>(values),
                                                    ptr<const uint16_t>(col_indices16)},
                               ptr<void>(blob));
        } else {
          pyhwp::csr_sell_pack(make_csr(rows, cols, nnz, row_offsets, col_indices, values, col_indices16),
                               ptr<void>(blob));
        }
      },
      py::arg("rows"), py::arg("cols"), py::arg("nnz"), py::arg("row_offsets"), py::arg("col_indices"),
      py::arg("values"), py::arg("col_indices16"), py::arg("blob"), py::arg("bf16") = false,
      py::call_guard<py::gil_scoped_release>(),
      "Writes the sliced-ELL copy of a validated CSR matrix (float32 values, or bfloat16 bits with "
      "bf16=True) into blob (csr_sell_bytes bytes, 64-byte aligned)");

  // Conv geometry as a tuple (images, channels, h, w, pt, pl, kh, kw, dh, dw, ho, wo[, sh, sw]),
  // stride 1 when the last two are left out.
  using Geometry = std::vector<int64_t>;
  auto conv_geometry = [](const Geometry& t) {
    PYHWP_CHECK(t.size() == 12 || t.size() == 14, "conv geometry: ", t.size(), " entries, expected 12 or 14");
    pyhwp::ConvGeometry g{t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8], t[9], t[10], t[11]};
    if (t.size() == 14) g.sh = t[12], g.sw = t[13];
    return g;
  };
  m.def(
      "csr_conv2d_aligned",
      [=](const Geometry& geometry) { return pyhwp::csr_conv2d_aligned(conv_geometry(geometry)); },
      py::arg("geometry"), "Whether the implicit-GEMM conv's plan for this geometry takes the aligned layout");
  m.def(
      "csr_conv2d_starts",
      [=](const Geometry& geometry, bool aligned) {
        return pyhwp::csr_conv2d_starts(conv_geometry(geometry), aligned);
      },
      py::arg("geometry"), py::arg("aligned"), "Block starts per row of the implicit-GEMM conv's plan");
  m.def(
      "csr_conv2d_plan",
      [=](int64_t rows, int64_t cols, int64_t nnz, Addr row_offsets, Addr col_indices, Addr col_indices16,
          Addr values, const Geometry& geometry, bool aligned, Addr offsets, Addr starts) {
        const CsrMatrix w = make_csr(rows, cols, nnz, row_offsets, col_indices, values, col_indices16);
        return pyhwp::csr_conv2d_plan(w, conv_geometry(geometry), aligned, ptr<int32_t>(offsets),
                                      ptr<int64_t>(starts));
      },
      py::arg("rows"), py::arg("cols"), py::arg("nnz"), py::arg("row_offsets"), py::arg("col_indices"),
      py::arg("col_indices16"), py::arg("values"), py::arg("geometry"), py::arg("aligned"), py::arg("offsets"),
      py::arg("starts"), py::call_guard<py::gil_scoped_release>(),
      "Writes the plan of a CSR conv weight (out x C*kh*kw, float32 values) for a geometry: nnz int32 offsets (the "
      "aligned plan: a stream of at most 2 * nnz int32 words holding its weights too) and csr_conv2d_starts * rows "
      "int64 block starts; returns how many offset words it wrote");
  m.def(
      "csr_conv2d",
      [=](int64_t rows, int64_t cols, int64_t nnz, Addr row_offsets, Addr values, const Geometry& geometry,
          bool aligned, Addr offsets, Addr starts, Addr x, Addr bias, Addr y, int num_threads) {
        // The kernels read the plan's offsets, not the column indices: pass offsets as the indices.
        const CsrMatrix w = make_csr(rows, cols, nnz, row_offsets, offsets, values);
        return pyhwp::csr_conv2d(w, conv_geometry(geometry), aligned, ptr<const int32_t>(offsets),
                                 ptr<const int64_t>(starts), ptr<const float>(x), ptr<const float>(bias),
                                 ptr<float>(y), num_threads);
      },
      py::arg("rows"), py::arg("cols"), py::arg("nnz"), py::arg("row_offsets"), py::arg("values"),
      py::arg("geometry"), py::arg("aligned"), py::arg("offsets"), py::arg("starts"), py::arg("x"), py::arg("bias"),
      py::arg("y"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
      "conv2d (any stride) with a CSR float32 weight (out x C*kh*kw) as an implicit GEMM through its plan "
      "(csr_conv2d_plan; the aligned plan's stream holds the weights: values may be 0): x is the contiguous "
      "(images, C, h, w) input, padded by pt rows on top and pl columns on the left, y the contiguous (images, out, "
      "ho, wo) output; returns True when x holds a NaN/Inf (y then lacks the dense 0*Inf = NaN terms)");

  m.def(
      "csr_matmul_bf16",
      [](int64_t rows, int64_t cols, int64_t nnz, Addr row_offsets, Addr col_indices, Addr values,
         Addr x, int64_t p, int64_t x_stride_k, int64_t x_stride_p, Addr bias, Addr y,
         int64_t y_stride_n, int64_t y_stride_p, int num_threads, Addr col_indices16, Addr sell,
         bool resident) {
        const pyhwp::CsrMatrixBf16 w{rows, cols, nnz, ptr<const int64_t>(row_offsets),
                                     ptr<const int32_t>(col_indices), ptr<const uint16_t>(values),
                                     ptr<const uint16_t>(col_indices16), ptr<const void>(sell), resident};
        const pyhwp::DenseInBf16 xin{ptr<const uint16_t>(x), cols, p, x_stride_k, x_stride_p};
        const pyhwp::DenseOutBf16 yout{ptr<uint16_t>(y), rows, p, y_stride_n, y_stride_p};
        pyhwp::csr_matmul_bf16(w, xin, ptr<const uint16_t>(bias), yout, num_threads);
      },
      py::arg("rows"), py::arg("cols"), py::arg("nnz"), py::arg("row_offsets"),
      py::arg("col_indices"), py::arg("values"), py::arg("x"), py::arg("p"),
      py::arg("x_stride_k"), py::arg("x_stride_p"), py::arg("bias"), py::arg("y"),
      py::arg("y_stride_n"), py::arg("y_stride_p"), py::arg("num_threads"),
      py::arg("col_indices16") = 0, py::arg("sell") = 0, py::arg("resident") = false,
      py::call_guard<py::gil_scoped_release>(),
      "csr_matmul with bfloat16 values, X, bias and Y (float32 accumulation, one rounding); sell: "
      "optional sliced-ELL copy with bfloat16 values (csr_sell_pack with bf16=True); resident: as "
      "in csr_matmul");

  m.def(
      "sparse24_matmul",
      [](int64_t rows, int64_t cols, Addr values, Addr meta, Addr x, int64_t p, int64_t x_stride_k,
         int64_t x_stride_p, Addr bias, Addr y, int64_t y_stride_n, int64_t y_stride_p,
         int num_threads) {
        const pyhwp::Sparse24Matrix w{rows, cols, ptr<const float>(values), ptr<const uint32_t>(meta)};
        const DenseIn xin{ptr<const float>(x), cols, p, x_stride_k, x_stride_p};
        const DenseOut yout{ptr<float>(y), rows, p, y_stride_n, y_stride_p};
        pyhwp::sparse24_matmul(w, xin, ptr<const float>(bias), yout, num_threads);
      },
      py::arg("rows"), py::arg("cols"), py::arg("values"), py::arg("meta"), py::arg("x"),
      py::arg("p"), py::arg("x_stride_k"), py::arg("x_stride_p"), py::arg("bias"), py::arg("y"),
      py::arg("y_stride_n"), py::arg("y_stride_p"), py::arg("num_threads"),
      py::call_guard<py::gil_scoped_release>(),
      "Y (rows x p) = W X + bias with W 2:4-compressed (rows x cols: float32 values "
      "(rows, Kp/2), uint32 meta (rows, Kp/32), Kp = cols rounded up to 32) and X (cols x p), "
      "host float32; element strides for X (k, p) and Y (n, p); bias address 0 for none");

  m.def(
      "sparse24_conv2d",
      [=](int64_t rows, int64_t cols, Addr values, Addr meta, const Geometry& geometry, Addr x, Addr bias, Addr y,
          int num_threads) {
        const pyhwp::Sparse24Matrix w{rows, cols, ptr<const float>(values), ptr<const uint32_t>(meta)};
        return pyhwp::sparse24_conv2d(w, conv_geometry(geometry), ptr<const float>(x), ptr<const float>(bias),
                                      ptr<float>(y), num_threads);
      },
      py::arg("rows"), py::arg("cols"), py::arg("values"), py::arg("meta"), py::arg("geometry"), py::arg("x"),
      py::arg("bias"), py::arg("y"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
      "conv2d (any stride) with a 2:4 float32 weight (out x C*kh*kw) as an implicit GEMM: x is the contiguous "
      "(images, C, h, w) input, padded by pt rows on top and pl columns on the left, y the contiguous "
      "(images, out, ho, wo) output; returns True when x holds a NaN/Inf (y then lacks the dense 0*Inf = NaN "
      "terms)");

  m.def(
      "amx_conv2d_bf16",
      [=](int64_t out, Addr tiles, Addr nonzero, const Geometry& geometry, bool channels_last, Addr x, Addr bias,
          Addr y, int num_threads) {
        const pyhwp::AmxConvWeight w{out, ptr<const uint16_t>(tiles), ptr<const uint8_t>(nonzero)};
        return static_cast<int>(pyhwp::amx_conv2d_bf16(w, conv_geometry(geometry), channels_last,
                                                       ptr<const uint16_t>(x), ptr<const uint16_t>(bias),
                                                       ptr<uint16_t>(y), num_threads));
      },
      py::arg("out"), py::arg("tiles"), py::arg("nonzero"), py::arg("geometry"),
      py::arg("channels_last"), py::arg("x"), py::arg("bias"), py::arg("y"), py::arg("num_threads"),
      py::call_guard<py::gil_scoped_release>(),
      "bfloat16 conv2d on the AMX tile unit (common/amx_conv.h): the weight as B tiles "
      "(out/16, taps, C/32, 16, 32) bfloat16 with one nonzero flag (uint8) per tile, x the (images, C, h, "
      "w) input and y the (images, out, ho, wo) output, both contiguous or both channels_last; returns 0 "
      "(done), 1 (x holds a NaN/Inf; y unspecified) or 2 (not served here: no usable tile unit, or a width "
      "stride above 2; y untouched)");

  m.def(
      "sparse24_conv2d_layout",
      [=](int64_t rows, int64_t cols, const Geometry& geometry, int num_threads) {
        const pyhwp::Sparse24Matrix w{rows, cols, nullptr, nullptr};
        return pyhwp::sparse24_conv2d_layout(w, conv_geometry(geometry), num_threads);
      },
      py::arg("rows"), py::arg("cols"), py::arg("geometry"), py::arg("num_threads"),
      "The layout sparse24_conv2d reads x in, (segments, bands): (0, 1) plain, else its shifted copies");

  m.def(
      "sparse24_matmul_bf16",
      [](int64_t rows, int64_t cols, Addr values, Addr meta, Addr x, int64_t p, int64_t x_stride_k,
         int64_t x_stride_p, Addr bias, Addr y, int64_t y_stride_n, int64_t y_stride_p,
         int num_threads) {
        const pyhwp::Sparse24MatrixBf16 w{rows, cols, ptr<const uint16_t>(values), ptr<const uint32_t>(meta)};
        const pyhwp::DenseInBf16 xin{ptr<const uint16_t>(x), cols, p, x_stride_k, x_stride_p};
        const pyhwp::DenseOutBf16 yout{ptr<uint16_t>(y), rows, p, y_stride_n, y_stride_p};
        pyhwp::sparse24_matmul_bf16(w, xin, ptr<const uint16_t>(bias), yout, num_threads);
      },
      py::arg("rows"), py::arg("cols"), py::arg("values"), py::arg("meta"), py::arg("x"),
      py::arg("p"), py::arg("x_stride_k"), py::arg("x_stride_p"), py::arg("bias"), py::arg("y"),
      py::arg("y_stride_n"), py::arg("y_stride_p"), py::arg("num_threads"),
      py::call_guard<py::gil_scoped_release>(),
      "sparse24_matmul with bfloat16 values, X, bias and Y (float32 accumulation, one rounding)");

  m.def(
      "masked_tile", [] { return py::make_tuple(pyhwp::MaskedCpuConfig::kTileN, pyhwp::MaskedCpuConfig::kTileK); },
      "(rows, cols) of the tiles the masked kernels store and skip");
  m.def(
      "masked_validate",
      [](int64_t rows, int64_t cols, int64_t ntiles, Addr tile_ptr, Addr tile_idx, Addr values) {
        pyhwp::masked_validate(make_masked(rows, cols, ntiles, tile_ptr, tile_idx, values));
      },
      py::arg("rows"), py::arg("cols"), py::arg("ntiles"), py::arg("tile_ptr"), py::arg("tile_idx"),
      py::arg("values"), py::call_guard<py::gil_scoped_release>(),
      "Check the tile structure of a masked weight (host arrays: int64 tile_ptr, int32 tile_idx)");
  m.def(
      "masked_matmul",
      [](int64_t rows, int64_t cols, int64_t ntiles, Addr tile_ptr, Addr tile_idx, Addr values,
         Addr x, int64_t p, int64_t x_stride_k, int64_t x_stride_p, Addr bias, Addr y,
         int64_t y_stride_n, int64_t y_stride_p, int num_threads) {
        const MaskedMatrix w = make_masked(rows, cols, ntiles, tile_ptr, tile_idx, values);
        const DenseIn xin{ptr<const float>(x), cols, p, x_stride_k, x_stride_p};
        const DenseOut yout{ptr<float>(y), rows, p, y_stride_n, y_stride_p};
        pyhwp::masked_matmul(w, xin, ptr<const float>(bias), yout, num_threads);
      },
      py::arg("rows"), py::arg("cols"), py::arg("ntiles"), py::arg("tile_ptr"), py::arg("tile_idx"),
      py::arg("values"), py::arg("x"), py::arg("p"), py::arg("x_stride_k"), py::arg("x_stride_p"),
      py::arg("bias"), py::arg("y"), py::arg("y_stride_n"), py::arg("y_stride_p"),
      py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
      "Y (rows x p) = W X + bias with W in the masked tile layout (rows x cols) and X (cols x p), "
      "host float32; element strides for X (k, p) and Y (n, p); bias address 0 for none");
  m.def(
      "masked_conv2d",
      [=](int64_t rows, int64_t cols, int64_t ntiles, Addr tile_ptr, Addr tile_idx, Addr values,
          const Geometry& geometry, Addr x, Addr bias, Addr y, int num_threads, Addr values_bf16) {
        const MaskedMatrix w = make_masked(rows, cols, ntiles, tile_ptr, tile_idx, values);
        return static_cast<int>(pyhwp::masked_conv2d(w, conv_geometry(geometry), ptr<const float>(x),
                                                     ptr<const float>(bias), ptr<float>(y), num_threads,
                                                     ptr<const uint16_t>(values_bf16)));
      },
      py::arg("rows"), py::arg("cols"), py::arg("ntiles"), py::arg("tile_ptr"), py::arg("tile_idx"),
      py::arg("values"), py::arg("geometry"), py::arg("x"), py::arg("bias"), py::arg("y"),
      py::arg("num_threads"), py::arg("values_bf16") = Addr{0}, py::call_guard<py::gil_scoped_release>(),
      "conv2d (any stride) with a masked float32 weight (out x C*kh*kw) as an implicit GEMM: x the "
      "contiguous (images, C, h, w) input, y the contiguous (images, out, ho, wo) output; returns 0 (done), "
      "1 (x holds a NaN/Inf; y unspecified) or 2 (not served here: neither the AVX-512 nor the AVX2 kernels "
      "are in use; y untouched). values_bf16: the same values as bfloat16 (a bfloat16 conv on float32 copies), "
      "for the AVX512-BF16 kernel; 0 for none");
  m.def(
      "masked_matmul_bf16",
      [](int64_t rows, int64_t cols, int64_t ntiles, Addr tile_ptr, Addr tile_idx, Addr values,
         Addr x, int64_t p, int64_t x_stride_k, int64_t x_stride_p, Addr bias, Addr y,
         int64_t y_stride_n, int64_t y_stride_p, int num_threads) {
        const pyhwp::MaskedMatrixBf16 w{rows, cols, ntiles, ptr<const int64_t>(tile_ptr),
                                        ptr<const int32_t>(tile_idx), ptr<const uint16_t>(values)};
        const pyhwp::DenseInBf16 xin{ptr<const uint16_t>(x), cols, p, x_stride_k, x_stride_p};
        const pyhwp::DenseOutBf16 yout{ptr<uint16_t>(y), rows, p, y_stride_n, y_stride_p};
        pyhwp::masked_matmul_bf16(w, xin, ptr<const uint16_t>(bias), yout, num_threads);
      },
      py::arg("rows"), py::arg("cols"), py::arg("ntiles"), py::arg("tile_ptr"), py::arg("tile_idx"),
      py::arg("values"), py::arg("x"), py::arg("p"), py::arg("x_stride_k"), py::arg("x_stride_p"),
      py::arg("bias"), py::arg("y"), py::arg("y_stride_n"), py::arg("y_stride_p"),
      py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
      "masked_matmul with bfloat16 values, X, bias and Y (float32 accumulation, one rounding)");

#ifdef PYHWP_WITH_CUDA
  auto stride1_geometry = [=](const Geometry& t) {  // the CUDA conv is stride 1 only
    const pyhwp::ConvGeometry g = conv_geometry(t);
    PYHWP_CHECK(g.sh == 1 && g.sw == 1, "the CUDA implicit-GEMM conv is stride 1 only, got stride (", g.sh, ", ",
                g.sw, ")");
    return g;
  };
  m.def(
      "csr_to_dense_cuda",
      [](int64_t rows, int64_t cols, Addr row_offsets, Addr col_indices, Addr values, Addr dense,
         Addr stream) {
        pyhwp::csr_to_dense_cuda(rows, cols, ptr<const int64_t>(row_offsets),
                                 ptr<const int32_t>(col_indices), ptr<const float>(values),
                                 ptr<float>(dense), ptr<void>(stream));
      },
      py::arg("rows"), py::arg("cols"), py::arg("row_offsets"), py::arg("col_indices"),
      py::arg("values"), py::arg("dense"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(),
      "Scatter a CSR matrix into a zero-filled dense row-major buffer (device pointers)");

  // CUDA matmuls: every address is a device pointer; dtype is pyhwp::DType (0 float32,
  // 1 float16, 2 bfloat16); X (K x P) and Y (N x P) come as element strides (k, p) and (n, p).
  // The *_workspace functions take the same operands and return the scratch bytes the call needs.
  m.def(
      "csr_matmul_cuda_workspace",
      [](int64_t rows, int64_t cols, int64_t nnz, int dtype, Addr x, int64_t p, int64_t x_stride_k,
         int64_t x_stride_p, Addr y, int64_t y_stride_n, int64_t y_stride_p) {
        const pyhwp::CsrCudaMatrix w{rows, cols, nnz, nullptr, nullptr, nullptr, nullptr};
        return pyhwp::csr_matmul_cuda_workspace(
            w, static_cast<pyhwp::DType>(dtype),
            pyhwp::DeviceDenseIn{ptr<const void>(x), cols, p, x_stride_k, x_stride_p},
            pyhwp::DeviceDenseOut{ptr<void>(y), rows, p, y_stride_n, y_stride_p});
      },
      py::arg("rows"), py::arg("cols"), py::arg("nnz"), py::arg("dtype"), py::arg("x"), py::arg("p"),
      py::arg("x_stride_k"), py::arg("x_stride_p"), py::arg("y"), py::arg("y_stride_n"),
      py::arg("y_stride_p"), "Scratch bytes csr_matmul_cuda needs for these operands");
  m.def(
      "csr_matmul_cuda",
      [](int64_t rows, int64_t cols, int64_t nnz, Addr row_offsets, Addr col_indices, Addr values,
         Addr row_order, int dtype, Addr x, int64_t p, int64_t x_stride_k, int64_t x_stride_p,
         Addr bias, Addr y, int64_t y_stride_n, int64_t y_stride_p, Addr workspace,
         size_t workspace_bytes, Addr stream) {
        const pyhwp::CsrCudaMatrix w{rows, cols, nnz, ptr<const int64_t>(row_offsets),
                                     ptr<const int32_t>(col_indices), ptr<const void>(values),
                                     ptr<const int32_t>(row_order)};
        pyhwp::csr_matmul_cuda(
            w, static_cast<pyhwp::DType>(dtype),
            pyhwp::DeviceDenseIn{ptr<const void>(x), cols, p, x_stride_k, x_stride_p},
            ptr<const void>(bias), pyhwp::DeviceDenseOut{ptr<void>(y), rows, p, y_stride_n, y_stride_p},
            ptr<void>(workspace), workspace_bytes, ptr<void>(stream));
      },
      py::arg("rows"), py::arg("cols"), py::arg("nnz"), py::arg("row_offsets"),
      py::arg("col_indices"), py::arg("values"), py::arg("row_order"), py::arg("dtype"),
      py::arg("x"), py::arg("p"), py::arg("x_stride_k"), py::arg("x_stride_p"), py::arg("bias"),
      py::arg("y"), py::arg("y_stride_n"), py::arg("y_stride_p"), py::arg("workspace"),
      py::arg("workspace_bytes"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "Y (rows x p) = W X + bias on the GPU, W CSR (row_order address 0 = identity order), "
      "bias address 0 for none; asynchronous on `stream`");
  m.def(
      "csr_conv2d_cuda_planes",
      [=](const Geometry& geometry) {
        const pyhwp::ConvPlanes pl = pyhwp::csr_conv2d_cuda_planes(stride1_geometry(geometry));
        return std::array<int64_t, 3>{pl.hp, pl.wp, pl.plane};
      },
      py::arg("geometry"), "(hp, wp, plane) of the padded planes the CUDA implicit-GEMM conv reads");
  m.def(
      "csr_conv2d_cuda_workspace",
      [=](int64_t rows, int64_t cols, int64_t nnz, int dtype, const Geometry& geometry) {
        const pyhwp::CsrCudaMatrix w{rows, cols, nnz, nullptr, nullptr, nullptr, nullptr};
        return pyhwp::csr_conv2d_cuda_workspace(w, static_cast<pyhwp::DType>(dtype), stride1_geometry(geometry));
      },
      py::arg("rows"), py::arg("cols"), py::arg("nnz"), py::arg("dtype"), py::arg("geometry"),
      "Scratch bytes csr_conv2d_cuda needs for this geometry");
  m.def(
      "csr_conv2d_cuda",
      [=](int64_t rows, int64_t cols, int64_t nnz, Addr row_offsets, Addr offsets, Addr values, Addr row_order,
          int dtype, const Geometry& geometry, Addr x, Addr bias, Addr y, Addr workspace, size_t workspace_bytes,
          Addr stream) {
        const pyhwp::CsrCudaMatrix w{rows, cols, nnz, ptr<const int64_t>(row_offsets), nullptr,
                                     ptr<const void>(values), ptr<const int32_t>(row_order)};
        pyhwp::csr_conv2d_cuda(w, static_cast<pyhwp::DType>(dtype), stride1_geometry(geometry),
                               ptr<const int32_t>(offsets), ptr<const void>(x), ptr<const void>(bias), ptr<void>(y),
                               ptr<void>(workspace), workspace_bytes, ptr<void>(stream));
      },
      py::arg("rows"), py::arg("cols"), py::arg("nnz"), py::arg("row_offsets"), py::arg("offsets"),
      py::arg("values"), py::arg("row_order"), py::arg("dtype"), py::arg("geometry"), py::arg("x"),
      py::arg("bias"), py::arg("y"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(),
      "Stride-1 conv2d with a CSR weight on the GPU as one implicit GEMM over the batch, through the "
      "per-nnz int32 offsets into padded planes (csr_conv2d_cuda_planes); asynchronous on `stream`");
  m.def(
      "masked_matmul_cuda_workspace",
      [](int64_t rows, int64_t cols, Addr values, int64_t ld, int dtype, Addr x, int64_t p,
         int64_t x_stride_k, int64_t x_stride_p, Addr y, int64_t y_stride_n, int64_t y_stride_p, Addr tile_map) {
        const pyhwp::MaskedCudaWeight w{rows, cols, ptr<const void>(values), ld, nullptr,
                                        ptr<const int32_t>(tile_map)};
        return pyhwp::masked_matmul_cuda_workspace(
            w, static_cast<pyhwp::DType>(dtype),
            pyhwp::DeviceDenseIn{ptr<const void>(x), cols, p, x_stride_k, x_stride_p},
            pyhwp::DeviceDenseOut{ptr<void>(y), rows, p, y_stride_n, y_stride_p});
      },
      py::arg("rows"), py::arg("cols"), py::arg("values"), py::arg("ld"), py::arg("dtype"),
      py::arg("x"), py::arg("p"), py::arg("x_stride_k"), py::arg("x_stride_p"), py::arg("y"),
      py::arg("y_stride_n"), py::arg("y_stride_p"), py::arg("tile_map") = 0,
      "Scratch bytes masked_matmul_cuda needs");
  m.def(
      "masked_matmul_cuda",
      [](int64_t rows, int64_t cols, Addr values, int64_t ld, Addr tile_flags, int dtype, Addr x,
         int64_t p, int64_t x_stride_k, int64_t x_stride_p, Addr bias, Addr y, int64_t y_stride_n,
         int64_t y_stride_p, Addr workspace, size_t workspace_bytes, Addr stream, Addr tile_map) {
        const pyhwp::MaskedCudaWeight w{rows, cols, ptr<const void>(values), ld,
                                        ptr<const uint8_t>(tile_flags), ptr<const int32_t>(tile_map)};
        pyhwp::masked_matmul_cuda(
            w, static_cast<pyhwp::DType>(dtype),
            pyhwp::DeviceDenseIn{ptr<const void>(x), cols, p, x_stride_k, x_stride_p},
            ptr<const void>(bias), pyhwp::DeviceDenseOut{ptr<void>(y), rows, p, y_stride_n, y_stride_p},
            ptr<void>(workspace), workspace_bytes, ptr<void>(stream));
      },
      py::arg("rows"), py::arg("cols"), py::arg("values"), py::arg("ld"), py::arg("tile_flags"),
      py::arg("dtype"), py::arg("x"), py::arg("p"), py::arg("x_stride_k"), py::arg("x_stride_p"),
      py::arg("bias"), py::arg("y"), py::arg("y_stride_n"), py::arg("y_stride_p"),
      py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"), py::arg("tile_map") = 0,
      py::call_guard<py::gil_scoped_release>(),
      "Y (rows x p) = W X + bias on the GPU, W dense (row stride ld) with uint8 flags per 16x16 "
      "tile (0 = all zero, may be skipped), or with tile_map W's stored 16x16 tiles (values, "
      "tile_flags and ld unused: see MaskedCudaWeight); asynchronous on `stream`");
  m.def(
      "sparse24_matmul_cuda_workspace",
      [](int64_t rows, int64_t cols, int dtype, Addr x, int64_t p, int64_t x_stride_k, int64_t x_stride_p, Addr y,
         int64_t y_stride_n, int64_t y_stride_p) {
        const pyhwp::Sparse24CudaWeight w{rows, cols, nullptr, nullptr};
        return pyhwp::sparse24_matmul_cuda_workspace(
            w, static_cast<pyhwp::DType>(dtype),
            pyhwp::DeviceDenseIn{ptr<const void>(x), cols, p, x_stride_k, x_stride_p},
            pyhwp::DeviceDenseOut{ptr<void>(y), rows, p, y_stride_n, y_stride_p});
      },
      py::arg("rows"), py::arg("cols"), py::arg("dtype"), py::arg("x"), py::arg("p"), py::arg("x_stride_k"),
      py::arg("x_stride_p"), py::arg("y"), py::arg("y_stride_n"), py::arg("y_stride_p"),
      "Scratch bytes sparse24_matmul_cuda needs for these operands");
  m.def(
      "sparse24_matmul_cuda",
      [](int64_t rows, int64_t cols, Addr values, Addr meta, int dtype, Addr x, int64_t p, int64_t x_stride_k,
         int64_t x_stride_p, Addr bias, Addr y, int64_t y_stride_n, int64_t y_stride_p, Addr workspace,
         size_t workspace_bytes, Addr stream) {
        const pyhwp::Sparse24CudaWeight w{rows, cols, ptr<const void>(values), ptr<const uint32_t>(meta)};
        pyhwp::sparse24_matmul_cuda(
            w, static_cast<pyhwp::DType>(dtype),
            pyhwp::DeviceDenseIn{ptr<const void>(x), cols, p, x_stride_k, x_stride_p},
            ptr<const void>(bias), pyhwp::DeviceDenseOut{ptr<void>(y), rows, p, y_stride_n, y_stride_p},
            ptr<void>(workspace), workspace_bytes, ptr<void>(stream));
      },
      py::arg("rows"), py::arg("cols"), py::arg("values"), py::arg("meta"), py::arg("dtype"), py::arg("x"),
      py::arg("p"), py::arg("x_stride_k"), py::arg("x_stride_p"), py::arg("bias"), py::arg("y"),
      py::arg("y_stride_n"), py::arg("y_stride_p"), py::arg("workspace"), py::arg("workspace_bytes"),
      py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "Y (rows x p) = W X + bias on sparse tensor cores, W 2:4 (values (rows, Kp/2) float16/bfloat16, "
      "uint32 meta (rows, Kp/32): the CPU layout), bias address 0 for none; asynchronous on `stream`");
  m.def(
      "sparse24_compress_cuda",
      [](int64_t rows, int64_t cols, Addr dense, int64_t ld, int dtype, Addr values, Addr meta, Addr bad,
         Addr stream) {
        pyhwp::sparse24_compress_cuda(rows, cols, ptr<const void>(dense), ld, static_cast<pyhwp::DType>(dtype),
                                      ptr<void>(values), ptr<uint32_t>(meta), ptr<int64_t>(bad), ptr<void>(stream));
      },
      py::arg("rows"), py::arg("cols"), py::arg("dense"), py::arg("ld"), py::arg("dtype"), py::arg("values"),
      py::arg("meta"), py::arg("bad"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "Compress a dense (rows, cols) weight (row stride ld) into 2:4 values + meta on the GPU; `bad` (int64, "
      "preset to INT64_MAX) receives the smallest row * (Kp/4) + group with more than 2 non-zeros");
#endif
}
