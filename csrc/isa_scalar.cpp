// Portable kernels (baseline flags; the only path on non-x86 CPUs such as aarch64).
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>

#include "flare_native.h"

namespace {
#include "kernels/common.h"
#include "kernels/simd_scalar.h"
#include "kernels/kernels_f32.h"

const KernelTable kTable = {
    "scalar", &dequantize_f<VScalar>, &linear_f<VScalar>, &linear_dx_f<VScalar>, &rank_down_f<VScalar>,
    &rank_reduce_f<VScalar>,
};
}  // namespace

namespace flare_native {
const KernelTable* table_scalar() { return &kTable; }
}  // namespace flare_native
