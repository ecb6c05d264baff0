// CPU instruction-set detection and the one switch that selects a kernel's ISA variant.
#pragma once
#include <string>

namespace pyhwp {

// Kernel variants, from the most portable to the fastest. kAvx512Bf16 is AVX-512 plus AVX512-BF16's
// dot products (VDPBF16PS; AMD Zen 4 and later, Intel Sapphire Rapids and later): the bfloat16
// masked and 2:4 matmuls run them from a few columns of X up, every other op its AVX-512 kernel.
// kAmx adds the AMX tile unit, which those matmuls and the bfloat16 convs use where it serves.
enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAmx = 4 };

struct CpuFeatures {
  bool avx2 = false;        // AVX2 + FMA
  bool avx512 = false;      // AVX-512 F/VL/BW/DQ
  bool avx512_bf16 = false;
  bool avx512_vbmi2 = false;
  bool amx_bf16 = false;    // the CPU has AMX-BF16
  bool amx = false;         // AMX-BF16 usable here: AVX512-BF16 and -VBMI2 too (every AMX CPU has
                            // them), and Linux let this process use tiles
  // Kernel choices by vendor, measured on a Zen 4: AMD's gathers cost more than Intel's, so the
  // CSR gather kernel takes x's terms by scalar loads rather than VGATHERDPS, and serves batches
  // 1 and 2 only (the tile kernel from 3 columns; csr_matmul_cpu.cpp, csr_matmul_avx2.cpp).
  bool slow_gathers = false;
};

// What the CPU running this process supports (cpuid, queried once).
const CpuFeatures& cpu_features();

// The best kernel variant compiled into this build: kAmx (with every variant below it) where the
// x86 kernels are built (PYHWP_X86_KERNELS, x86-64 hosts) by a compiler with AMX and AVX512-BF16
// intrinsics (PYHWP_AMX_KERNELS, which builds the kAvx512Bf16 kernels too), kAvx512 where it has
// none, else kScalar (the portable kernels, which serve
// every op on other architectures).
Isa best_compiled_isa();

// The ISA the kernels use: the best one the CPU supports and this build compiled, unless capped
// by set_isa_cap.
Isa active_isa();

// The ISA of the vector kernels: active_isa() with kAvx512Bf16 and kAmx read as kAvx512. Every
// dispatch of SIMD kernels takes this one; only the bfloat16 dot-product and AMX entry points look
// at active_isa().
Isa vector_isa();

// Caps the kernels to `cap` (for tests and benchmarks of the fallbacks); never raises the ISA
// above what the CPU supports and the build compiled. Returns the ISA now active.
Isa set_isa_cap(Isa cap);

// Whether the kernels take gathers as slow: CpuFeatures::slow_gathers, unless set_slow_gathers
// overrode it.
bool slow_gathers();

// Overrides slow_gathers() with `mode` 1 (slow) or 0 (fast), or -1 for the CPU's own, so that tests
// run both kernels on any x86 CPU; returns the previous mode.
int set_slow_gathers(int mode);

const char* isa_name(Isa isa);
Isa isa_from_name(const std::string& name);  // throws std::invalid_argument on unknown names

}  // namespace pyhwp
