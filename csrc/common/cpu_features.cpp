// CPU instruction-set detection (gcc/clang builtins over cpuid) and the ISA cap.
#include "common/cpu_features.h"

#include <atomic>

#if defined(PYHWP_AMX_KERNELS) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "common/checks.h"

namespace pyhwp {

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = [] {
    CpuFeatures r;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    r.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    r.avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
    r.avx512_bf16 = r.avx512 && __builtin_cpu_supports("avx512bf16");
    r.slow_gathers = __builtin_cpu_is("amd");
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
    r.amx_bf16 = __builtin_cpu_supports("amx-bf16") && __builtin_cpu_supports("amx-tile");
    r.avx512_vbmi2 = r.avx512 && __builtin_cpu_supports("avx512vbmi2");
#endif
#endif
#if defined(PYHWP_AMX_KERNELS) && defined(__linux__)
    // Linux enables the 8 KiB tile state per process on request (arch_prctl, kernel >= 5.16); a
    // tile instruction without it faults. oneDNN asks the same way, so torch may have already.
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    r.amx = r.amx_bf16 && r.avx512_bf16 && r.avx512_vbmi2 && syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#endif
    return r;
  }();
  return f;
}

Isa best_compiled_isa() {
#if defined(PYHWP_AMX_KERNELS)
  return Isa::kAmx;
#elif defined(PYHWP_X86_KERNELS)
  return Isa::kAvx512;
#else
  return Isa::kScalar;
#endif
}

// The more portable of two ISAs (Isa is ordered from the most portable up).
static Isa lower(Isa a, Isa b) { return static_cast<int>(a) < static_cast<int>(b) ? a : b; }

// The best ISA that both the CPU runs and this build has kernels for.
static Isa best_isa() {
  const CpuFeatures& f = cpu_features();
  // kAvx512Bf16's kernels are compiled with the AMX files' flags, AVX512-BF16 and -VBMI2 among them.
  const Isa cpu = f.amx                               ? Isa::kAmx
                  : f.avx512_bf16 && f.avx512_vbmi2   ? Isa::kAvx512Bf16
                  : f.avx512                          ? Isa::kAvx512
                  : f.avx2                            ? Isa::kAvx2
                                                      : Isa::kScalar;
  return lower(cpu, best_compiled_isa());
}

static std::atomic<int> g_isa{static_cast<int>(best_isa())};

Isa active_isa() { return static_cast<Isa>(g_isa.load(std::memory_order_relaxed)); }

Isa vector_isa() { return lower(active_isa(), Isa::kAvx512); }

Isa set_isa_cap(Isa cap) {
  const Isa isa = lower(cap, best_isa());
  g_isa.store(static_cast<int>(isa));
  return isa;
}

static std::atomic<int> g_slow_gathers{-1};

bool slow_gathers() {
  const int mode = g_slow_gathers.load(std::memory_order_relaxed);
  return mode < 0 ? cpu_features().slow_gathers : mode == 1;
}

int set_slow_gathers(int mode) {
  PYHWP_CHECK(mode >= -1 && mode <= 1, "set_slow_gathers: mode must be -1, 0 or 1, got ", mode);
  return g_slow_gathers.exchange(mode);
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAmx: return "amx";
    case Isa::kAvx512Bf16: return "avx512_bf16";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

Isa isa_from_name(const std::string& name) {
  if (name == "amx") return Isa::kAmx;
  if (name == "avx512_bf16") return Isa::kAvx512Bf16;
  if (name == "avx512") return Isa::kAvx512;
  if (name == "avx2") return Isa::kAvx2;
  if (name == "scalar") return Isa::kScalar;
  fail("unknown ISA '", name, "': expected 'scalar', 'avx2', 'avx512', 'avx512_bf16' or 'amx'");
}

}  // namespace pyhwp
