// Interface between the torch op layer (ops.cpp) and the per-ISA kernels (isa_*.cpp).
//
// Plain structs and function pointers only: the ISA translation units are compiled with their
// own -m flags (AVX2, AVX-512, AMX) and must not share inline code with the rest of the library
// (an inline function compiled with -mavx512f and merged by the linker into a baseline caller
// would fault on an older CPU). So this header defines no functions, and every ISA file keeps its
// code in an anonymous namespace.
//
// Layouts (see flare_kernels/format/nf4.py): W [N, K] flattened row-major, flat index i = n*K + k,
// byte i/2, first element in the HIGH nibble; block b = i >> log2_bs; value = code[q] * scale(b),
// scale(b) = absmax_f32[b], or with double quantization
// nested_code[absmax_u8[b]] * nested_absmax[b >> 8] + nested_offset (fp32, two roundings).
#pragma once

#include <cstddef>
#include <cstdint>

namespace flare_native {

enum DType : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

struct NF4 {
  const uint8_t* packed;        // ceil(N*K/2) bytes
  const float* absmax_f32;      // [n_blocks] (plain) or null
  const uint8_t* absmax_u8;     // [n_blocks] codes (double quantization) or null
  const float* code;            // [16]
  const float* nested_code;     // [256] or null
  const float* nested_absmax;   // [ceil(n_blocks / 256)] or null
  float nested_offset;
  int64_t N, K;
  int32_t log2_bs;
};

// `count` rows of activations, row i at data + i * stride elements, unit stride along the row.
struct Rows {
  const void* data;
  int64_t stride;
  int64_t count;
};

// Keep-masks of inverted dropout: uint8 [rows, cols] (0 = dropped), row stride in bytes.
struct Mask {
  const uint8_t* data;  // null: no dropout
  int64_t stride;
};

// The caller's thread pool (at::parallel_for), so that the ISA files need no ATen headers.
struct Runtime {
  void (*parallel_for)(int64_t begin, int64_t end, int64_t grain, void (*body)(void*, int64_t, int64_t),
                       void* ctx);
};

// y[s][m, n] = sum_k x[s][m, k] W[n, k] + bias[n] (+ scaling * sum_j z[m, j] B[n, j] for s == 0)
struct LinearArgs {
  NF4 w;
  DType dtype;              // of x, source and y
  Rows x[2];                // stream 0: target rows (LoRA); stream 1: source rows (count 0: absent)
  void* y[2];               // [count, N] contiguous, dtype
  const float* bias;        // [N] or null
  const float* z;           // [x[0].count, r] fused rank-r intermediate or null (no LoRA)
  const float* lora_B;      // [N, r]
  int64_t r;
  float scaling;
};

// dx[m, k] = sum_n dy[m, n] W[n, k] + keep(m, k) * sum_j ds[m, j] A[j, k]
struct DxArgs {
  NF4 w;
  DType dtype;              // of dy and dx
  Rows dy;                  // [M, N]
  void* dx;                 // [M, K] contiguous
  const float* ds;          // [M, r] or null
  const float* lora_A;      // [r, K]
  int64_t r;
  Mask mask;                // target stream's keep-mask [M, K]
  float keep_scale;
};

// out[m, j] = out_scale * sum_c keep(m, c) x[m, c] v[j, c]           (drop(x) v^T)
struct DownArgs {
  Rows x;
  DType dtype;
  int64_t cols;
  Mask mask;
  float keep_scale;
  const float* v;           // [r, cols]
  int64_t r;
  float out_scale;
  float* out;               // [M, r]
};

// out[j, c] = sum_s sum_m l[s][m, j] keep_s(m, c) x[s][m, c]       (l^T drop(x), streams summed)
struct ReduceArgs {
  int32_t streams;
  Rows x[2];
  const float* l[2];        // [M, r] each
  Mask mask[2];
  float keep_scale;
  DType dtype;
  int64_t cols;
  int64_t r;
  float* out;               // [r, cols]
};

struct KernelTable {
  const char* name;
  // W as a dense [N, K] tensor of `dtype` (bitsandbytes' dequantize_4bit), written to `out`.
  void (*dequantize)(const Runtime&, const NF4&, DType dtype, void* out);
  void (*linear)(const Runtime&, const LinearArgs&);
  void (*linear_dx)(const Runtime&, const DxArgs&);
  void (*rank_down)(const Runtime&, const DownArgs&);
  void (*rank_reduce)(const Runtime&, const ReduceArgs&);
};

// One table per instruction set; null when this build or this CPU lacks it (dispatch.cpp).
const KernelTable* table_scalar();
const KernelTable* table_avx2();
const KernelTable* table_avx512();
const KernelTable* table_avx512_bf16();
const KernelTable* table_amx();

}  // namespace flare_native
