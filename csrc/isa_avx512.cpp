// AVX-512 (F, BW, VL, DQ) kernels, and with FLARE_AVX512_BF16 / FLARE_AMX the bf16 paths on top
// of them: this file is compiled up to three times with different flags (see CMakeLists.txt).
#include <immintrin.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>

#include "flare_native.h"

namespace {
#include "kernels/common.h"
#include "kernels/simd_avx512.h"
#include "kernels/kernels_f32.h"
#if defined(FLARE_AVX512_BF16) || defined(FLARE_AMX)
#include "kernels/kernels_bf16.h"
#endif
#if defined(FLARE_AMX)
#include "kernels/kernels_amx.h"
#endif

void dequantize(const Runtime& rt, const NF4& w, DType dt, void* out) {
#if defined(FLARE_AVX512_BF16) || defined(FLARE_AMX)
  if (dt == kBF16) return dequantize_bf16(rt, w, out);
#endif
  dequantize_f<VAvx512>(rt, w, dt, out);
}

#if defined(FLARE_AMX)
// Up to 2 rows (decode, FLARE: both streams) the register row-dot (vdpbf16ps on weights dequantized in
// registers) beats a 16-row tile that is mostly padding: 2.0 vs 2.5 ms single-threaded at 2 rows,
// while at 4 rows the tile wins (2.5 vs 3.2 ms; 4096 x 4096 bf16, kernels alone on one core).
constexpr int64_t kAmxMinRows = 3;
#endif

void linear(const Runtime& rt, const LinearArgs& a) {
#if defined(FLARE_AMX)
  if (a.dtype == kBF16 && a.x[0].count + a.x[1].count >= kAmxMinRows) return linear_amx(rt, a);
#endif
#if defined(FLARE_AVX512_BF16) || defined(FLARE_AMX)
  if (a.dtype == kBF16) return linear_bf16(rt, a);
#endif
  linear_f<VAvx512>(rt, a);
}

void linear_dx(const Runtime& rt, const DxArgs& a) {
#if defined(FLARE_AMX)
  if (a.dtype == kBF16) return linear_dx_amx(rt, a);
#endif
  linear_dx_f<VAvx512>(rt, a);
}

#if defined(FLARE_AMX)
#define FLARE_TABLE_NAME "amx"
#define FLARE_TABLE_FN table_amx
#elif defined(FLARE_AVX512_BF16)
#define FLARE_TABLE_NAME "avx512_bf16"
#define FLARE_TABLE_FN table_avx512_bf16
#else
#define FLARE_TABLE_NAME "avx512"
#define FLARE_TABLE_FN table_avx512
#endif

const KernelTable kTable = {
    FLARE_TABLE_NAME, &dequantize, &linear, &linear_dx, &rank_down_f<VAvx512>, &rank_reduce_f<VAvx512>,
};
}  // namespace

namespace flare_native {
const KernelTable* FLARE_TABLE_FN() { return &kTable; }
}  // namespace flare_native
