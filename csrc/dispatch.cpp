// Which kernel table runs: CPU features detected at run time (cpuid, the OS's enabled register
// state, and for AMX the Linux permission to use tile data), overridable by name.
#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "dispatch.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace flare_native {
namespace {

struct Entry {
  const char* name;
  const KernelTable* (*table)();
  bool (*cpu_has)();
};

#if defined(__x86_64__) || defined(_M_X64)
struct Cpuid {
  unsigned a = 0, b = 0, c = 0, d = 0;
};
Cpuid cpuid(unsigned leaf, unsigned sub) {
  Cpuid r;
  if (!__get_cpuid_count(leaf, sub, &r.a, &r.b, &r.c, &r.d)) r = Cpuid{};
  return r;
}
unsigned long long xcr0() {
  if (!(cpuid(1, 0).c & (1u << 27))) return 0;  // no OSXSAVE
  unsigned eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}
bool has_avx2() {
  const Cpuid l1 = cpuid(1, 0), l7 = cpuid(7, 0);
  const bool fma = l1.c & (1u << 12), f16c = l1.c & (1u << 29), avx2 = l7.b & (1u << 5);
  return fma && f16c && avx2 && (xcr0() & 0x6) == 0x6;  // XMM and YMM state
}
bool has_avx512() {
  const Cpuid l7 = cpuid(7, 0);
  const unsigned need = (1u << 16) | (1u << 17) | (1u << 30) | (1u << 31);  // F, DQ, BW, VL
  return has_avx2() && (l7.b & need) == need && (xcr0() & 0xe6) == 0xe6;   // + opmask, ZMM state
}
bool has_avx512_bf16() { return has_avx512() && (cpuid(7, 1).a & (1u << 5)); }
bool has_amx() {
  const Cpuid l7 = cpuid(7, 0);
  const bool tile = l7.d & (1u << 24), bf16 = l7.d & (1u << 22);
  if (!(has_avx512_bf16() && tile && bf16)) return false;
#if defined(__linux__)
  // Linux hands out the 8 KiB tile state per process on request (ARCH_REQ_XCOMP_PERM, feature 18).
  static const bool granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return granted && (xcr0() & 0x60000) == 0x60000;
#else
  return false;
#endif
}
#endif

bool always() { return true; }

const std::vector<Entry>& entries() {
  static const std::vector<Entry> all = {
      {"scalar", &table_scalar, &always},
#if defined(FLARE_HAVE_AVX2)
      {"avx2", &table_avx2, &has_avx2},
#endif
#if defined(FLARE_HAVE_AVX512)
      {"avx512", &table_avx512, &has_avx512},
      {"avx512_bf16", &table_avx512_bf16, &has_avx512_bf16},
#endif
#if defined(FLARE_HAVE_AMX)
      {"amx", &table_amx, &has_amx},
#endif
  };
  return all;
}

const KernelTable* best() {
  const KernelTable* t = nullptr;
  for (const Entry& e : entries())
    if (e.cpu_has()) t = e.table();
  return t;
}

const KernelTable* by_name(const std::string& name) {
  if (name.empty() || name == "auto") return best();
  for (const Entry& e : entries()) {
    if (name != e.name) continue;
    if (!e.cpu_has()) throw std::invalid_argument("instruction set '" + name + "' is not supported by this CPU");
    return e.table();
  }
  std::string known;
  for (const Entry& e : entries()) known += std::string(known.empty() ? "" : ", ") + e.name;
  throw std::invalid_argument("unknown instruction set '" + name + "'; this build has: " + known);
}

std::atomic<const KernelTable*>& current() {
  static std::atomic<const KernelTable*> t{[] {
    const char* env = std::getenv("FLARE_KERNELS_CPU_ISA");
    try {
      return by_name(env ? env : "");
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument(std::string("FLARE_KERNELS_CPU_ISA: ") + e.what());
    }
  }()};
  return t;
}

}  // namespace

const KernelTable& active_table() { return *current().load(std::memory_order_acquire); }

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (const Entry& e : entries())
    if (e.cpu_has()) names.emplace_back(e.name);
  return names;
}

std::vector<std::string> built_isas() {
  std::vector<std::string> names;
  for (const Entry& e : entries()) names.emplace_back(e.name);
  return names;
}

std::string set_isa(const std::string& name) {
  const KernelTable* t = by_name(name);
  current().store(t, std::memory_order_release);
  return t->name;
}

}  // namespace flare_native
