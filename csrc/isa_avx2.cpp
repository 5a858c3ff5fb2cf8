// AVX2 + FMA + F16C kernels (compiled with -mavx2 -mfma -mf16c; chosen at run time).
#include <immintrin.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>

#include "flare_native.h"

namespace {
#include "kernels/common.h"
#include "kernels/simd_avx2.h"
#include "kernels/kernels_f32.h"

const KernelTable kTable = {
    "avx2", &dequantize_f<VAvx2>, &linear_f<VAvx2>, &linear_dx_f<VAvx2>, &rank_down_f<VAvx2>, &rank_reduce_f<VAvx2>,
};
}  // namespace

namespace flare_native {
const KernelTable* table_avx2() { return &kTable; }
}  // namespace flare_native
