// AMX-BF16 kernels: isa_avx512.cpp with the bf16 row-dot and the AMX tile GEMMs switched on.
#define FLARE_AMX 1
#include "isa_avx512.cpp"
