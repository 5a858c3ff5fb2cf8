// AVX-512 + AVX512-BF16 (vdpbf16ps) kernels: isa_avx512.cpp with the bf16 path switched on.
#define FLARE_AVX512_BF16 1
#include "isa_avx512.cpp"
