// torch.ops.flare_kernels_cpu.*: the native CPU kernels as PyTorch operators. Each op checks its
// arguments (they are reachable from Python directly), allocates outputs, fills the plain
// argument structs of flare_native.h and calls the kernel table that dispatch.cpp chose.
// The orchestration (down-projection, fusion, up-projection, backward) lives in
// flare_kernels/native/launch.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "dispatch.h"

#ifndef FLARE_TORCH_VERSION
#define FLARE_TORCH_VERSION "unknown"
#endif
#ifndef FLARE_BUILD_FLAGS
#define FLARE_BUILD_FLAGS ""
#endif

namespace flare_native {
namespace {

using at::Tensor;
using c10::optional;

void run_parallel(int64_t begin, int64_t end, int64_t grain, void (*body)(void*, int64_t, int64_t), void* ctx) {
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { body(ctx, b, e); });
}
const Runtime kRuntime{&run_parallel};

const KernelTable& table() {
  try {
    return active_table();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

DType dtype_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return kF32;
    case at::kHalf:
      return kF16;
    case at::kBFloat16:
      return kBF16;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, float16 or bfloat16 for the native CPU kernels, got ",
                       t.scalar_type());
  }
}

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got one on ", t.device());
}

// A float32 contiguous copy (or the tensor itself) of a small operand, checked for its shape.
Tensor f32(const Tensor& t, const char* name, at::IntArrayRef shape) {
  check_cpu(t, name);
  TORCH_CHECK_TYPE(t.is_floating_point(), name, " must be a floating tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  return t.to(at::kFloat).contiguous();
}

// Activation rows: 2-D, unit stride along the row (copied otherwise).
struct RowsOf {
  Tensor t;
  Rows rows;
};
RowsOf rows_of(const Tensor& x, const char* name) {
  check_cpu(x, name);
  TORCH_CHECK_VALUE(x.dim() == 2, name, " must be 2-D [rows, features], got shape ", x.sizes());
  dtype_of(x, name);
  Tensor t = x.size(1) <= 1 || x.stride(1) == 1 ? x : x.contiguous();
  return {t, Rows{t.data_ptr(), t.stride(0), t.size(0)}};
}

struct MaskOf {
  Tensor t;
  Mask mask;
};
MaskOf mask_of(const optional<Tensor>& m, int64_t rows, int64_t cols, const char* name) {
  if (!m.has_value()) return {Tensor(), Mask{nullptr, 0}};
  check_cpu(*m, name);
  TORCH_CHECK_TYPE(m->scalar_type() == at::kBool || m->scalar_type() == at::kByte, name,
                   " must be a bool or uint8 keep-mask, got ", m->scalar_type());
  TORCH_CHECK_VALUE(m->dim() == 2 && m->size(0) == rows && m->size(1) == cols, name, " must have shape [", rows,
                    ", ", cols, "], got ", m->sizes());
  Tensor t = m->size(1) <= 1 || m->stride(1) == 1 ? *m : m->contiguous();
  return {t, Mask{static_cast<const uint8_t*>(t.data_ptr()), t.stride(0)}};
}

struct WeightOf {
  std::vector<Tensor> keep;
  NF4 nf4;
};
WeightOf weight_of(const Tensor& packed, const Tensor& absmax, const Tensor& code, const optional<Tensor>& nested_absmax,
                   const optional<Tensor>& nested_code, const optional<Tensor>& nested_offset, int64_t N, int64_t K,
                   int64_t blocksize) {
  TORCH_CHECK_VALUE(N > 0 && K > 0, "the weight must have out_features > 0 and in_features > 0, got [", N, ", ", K,
                    "]");
  TORCH_CHECK_VALUE(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
                    "blocksize must be a power of two in [32, 4096], got ", blocksize);
  const int64_t n_blocks = (N * K + blocksize - 1) / blocksize;
  WeightOf w;
  auto take = [&](const Tensor& t, at::ScalarType type, int64_t numel, const char* name) {
    check_cpu(t, name);
    TORCH_CHECK_TYPE(t.scalar_type() == type, name, " must be ", type, ", got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.numel() == numel, name, " must have ", numel, " elements for a [", N, ", ", K,
                      "] weight with blocksize ", blocksize, ", got ", t.numel());
    w.keep.push_back(t.contiguous());
    return w.keep.back().data_ptr();
  };
  w.nf4.packed = static_cast<const uint8_t*>(take(packed, at::kByte, (N * K + 1) / 2, "packed"));
  w.nf4.code = static_cast<const float*>(take(code, at::kFloat, 16, "code"));
  const bool nested = nested_absmax.has_value();
  TORCH_CHECK_VALUE(nested == nested_code.has_value() && nested == nested_offset.has_value(),
                    "nested_absmax, nested_code and nested_offset go together");
  w.nf4.absmax_f32 = nullptr;
  w.nf4.absmax_u8 = nullptr;
  w.nf4.nested_code = nullptr;
  w.nf4.nested_absmax = nullptr;
  w.nf4.nested_offset = 0.0f;
  if (nested) {
    w.nf4.absmax_u8 = static_cast<const uint8_t*>(take(absmax, at::kByte, n_blocks, "absmax (nested codes)"));
    w.nf4.nested_code = static_cast<const float*>(take(*nested_code, at::kFloat, 256, "nested_code"));
    w.nf4.nested_absmax =
        static_cast<const float*>(take(*nested_absmax, at::kFloat, (n_blocks + 255) / 256, "nested_absmax"));
    w.nf4.nested_offset = *static_cast<const float*>(take(*nested_offset, at::kFloat, 1, "nested_offset"));
  } else {
    w.nf4.absmax_f32 = static_cast<const float*>(take(absmax, at::kFloat, n_blocks, "absmax"));
  }
  w.nf4.N = N;
  w.nf4.K = K;
  int32_t log2 = 0;
  while ((int64_t(1) << log2) < blocksize) ++log2;
  w.nf4.log2_bs = log2;
  return w;
}

#define FLARE_WEIGHT_ARGS                                                                                   \
  const Tensor &packed, const Tensor &absmax, const Tensor &code, const optional<Tensor>&nested_absmax, \
      const optional<Tensor>&nested_code, const optional<Tensor>&nested_offset
#define FLARE_WEIGHT packed, absmax, code, nested_absmax, nested_code, nested_offset

// ------------------------------------------------------------------------------------------ ops
Tensor dequantize(FLARE_WEIGHT_ARGS, int64_t out_features, int64_t in_features, int64_t blocksize,
                  at::ScalarType dtype) {
  WeightOf w = weight_of(FLARE_WEIGHT, out_features, in_features, blocksize);
  Tensor out = at::empty({out_features, in_features}, packed.options().dtype(dtype));
  table().dequantize(kRuntime, w.nf4, dtype_of(out, "dtype"), out.data_ptr());
  return out;
}

// Per-token fusions phi(s, t) of reference/fusion.py, by their index in FUSIONS (0 none, 1 add,
// 2 mul, 3 add_relu); relu keeps NaN, as torch's does.
Tensor fuse_tokens(const Tensor& s_t, const optional<Tensor>& s_s, int64_t fusion) {
  TORCH_CHECK_VALUE(fusion >= 0 && fusion <= 3, "fusion must be a per-token fusion index 0..3, got ", fusion);
  if (fusion == 0 || !s_s.has_value()) return s_t;
  const Tensor src = f32(*s_s, "s_source", s_t.sizes());
  Tensor z = at::empty_like(s_t);
  const float* a = src.data_ptr<float>();
  const float* t = s_t.data_ptr<float>();
  float* o = z.data_ptr<float>();
  for (int64_t i = 0, n = z.numel(); i < n; ++i) {
    const float u = a[i], v = t[i];
    o[i] = fusion == 1 ? u + v : fusion == 2 ? u * v : (u < 0.0f ? 0.0f : u) + (v < 0.0f ? 0.0f : v);
  }
  return z;
}

std::tuple<Tensor, Tensor> linear(const Tensor& x, const optional<Tensor>& source, FLARE_WEIGHT_ARGS,
                                  int64_t out_features, int64_t blocksize, const optional<Tensor>& bias,
                                  const optional<Tensor>& z, const optional<Tensor>& lora_B, double scaling,
                                  const optional<Tensor>& s_source, int64_t fusion) {
  RowsOf xr = rows_of(x, "x");
  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  WeightOf w = weight_of(FLARE_WEIGHT, N, K, blocksize);
  LinearArgs a{};
  a.w = w.nf4;
  a.dtype = dtype_of(x, "x");
  a.x[0] = xr.rows;
  RowsOf sr;
  if (source.has_value()) {
    sr = rows_of(*source, "source");
    TORCH_CHECK_TYPE(source->scalar_type() == x.scalar_type(), "source dtype ", source->scalar_type(),
                     " differs from x dtype ", x.scalar_type());
    TORCH_CHECK_VALUE(source->size(1) == K, "source has ", source->size(1), " features, x has ", K);
    a.x[1] = sr.rows;
  } else {
    a.x[1] = Rows{nullptr, 0, 0};
  }
  Tensor y = at::empty({M, N}, x.options());
  Tensor y_s = at::empty({a.x[1].count, N}, x.options());
  a.y[0] = y.data_ptr();
  a.y[1] = y_s.data_ptr();
  Tensor b, zz, bb;
  if (bias.has_value()) {
    b = f32(*bias, "bias", {N});
    a.bias = b.data_ptr<float>();
  }
  if (z.has_value()) {
    TORCH_CHECK_VALUE(lora_B.has_value(), "z needs lora_B");
    TORCH_CHECK_VALUE(z->dim() == 2, "z must be [rows, r], got shape ", z->sizes());
    const int64_t r = z->size(1);
    zz = fuse_tokens(f32(*z, "z", {M, r}), s_source, fusion);
    bb = f32(*lora_B, "lora_B", {N, r});
    a.z = zz.data_ptr<float>();
    a.lora_B = bb.data_ptr<float>();
    a.r = r;
    a.scaling = static_cast<float>(scaling);
  }
  if (M + a.x[1].count > 0) table().linear(kRuntime, a);
  return {y, y_s};
}

Tensor linear_dx(const Tensor& dy, FLARE_WEIGHT_ARGS, int64_t out_features, int64_t in_features, int64_t blocksize,
                 const optional<Tensor>& ds, const optional<Tensor>& lora_A, const optional<Tensor>& mask,
                 double keep_scale) {
  RowsOf dr = rows_of(dy, "dy");
  const int64_t M = dy.size(0), N = out_features, K = in_features;
  TORCH_CHECK_VALUE(dy.size(1) == N, "dy has ", dy.size(1), " columns, the weight has out_features=", N);
  WeightOf w = weight_of(FLARE_WEIGHT, N, K, blocksize);
  DxArgs a{};
  a.w = w.nf4;
  a.dtype = dtype_of(dy, "dy");
  a.dy = dr.rows;
  Tensor dx = at::empty({M, K}, dy.options());
  a.dx = dx.data_ptr();
  Tensor d, aa;
  if (ds.has_value()) {
    TORCH_CHECK_VALUE(lora_A.has_value(), "ds needs lora_A");
    TORCH_CHECK_VALUE(ds->dim() == 2, "ds must be [rows, r], got shape ", ds->sizes());
    const int64_t r = ds->size(1);
    d = f32(*ds, "ds", {M, r});
    aa = f32(*lora_A, "lora_A", {r, K});
    a.ds = d.data_ptr<float>();
    a.lora_A = aa.data_ptr<float>();
    a.r = r;
  }
  MaskOf mk = mask_of(mask, M, K, "mask");
  a.mask = mk.mask;
  a.keep_scale = static_cast<float>(keep_scale);
  if (M > 0) table().linear_dx(kRuntime, a);
  return dx;
}

Tensor down_one(const Tensor& x, const Tensor& vv, const optional<Tensor>& mask, double keep_scale,
                double out_scale, const char* name) {
  RowsOf xr = rows_of(x, name);
  const int64_t M = x.size(0), C = x.size(1), r = vv.size(0);
  TORCH_CHECK_VALUE(C == vv.size(1), name, " has ", C, " features, v has ", vv.size(1));
  MaskOf mk = mask_of(mask, M, C, "mask");
  Tensor out = at::empty({M, r}, x.options().dtype(at::kFloat));
  DownArgs a{xr.rows, dtype_of(x, name), C, mk.mask, static_cast<float>(keep_scale), vv.data_ptr<float>(), r,
             static_cast<float>(out_scale), out.data_ptr<float>()};
  if (M > 0 && r > 0) table().rank_down(kRuntime, a);
  return out;
}

// out_scale * drop(x) v^T for one or two streams (v converted to fp32 once for both).
std::tuple<Tensor, Tensor> lora_down(const Tensor& x, const Tensor& v, const optional<Tensor>& mask,
                                     const optional<Tensor>& x2, const optional<Tensor>& mask2, double keep_scale,
                                     double out_scale) {
  TORCH_CHECK_VALUE(x.dim() == 2 && v.dim() == 2, "x must be [rows, features] and v [r, features], got ", x.sizes(),
                    " and ", v.sizes());
  Tensor vv = f32(v, "v", {v.size(0), x.size(1)});
  Tensor out = down_one(x, vv, mask, keep_scale, out_scale, "x");
  Tensor out2 = x2.has_value() ? down_one(*x2, vv, mask2, keep_scale, out_scale, "x2")
                               : at::empty({0, vv.size(0)}, x.options().dtype(at::kFloat));
  return {out, out2};
}

Tensor rank_reduce(const Tensor& l, const Tensor& x, const optional<Tensor>& mask, const optional<Tensor>& l2,
                   const optional<Tensor>& x2, const optional<Tensor>& mask2, double keep_scale) {
  RowsOf xr = rows_of(x, "x");
  const int64_t M = x.size(0), C = x.size(1);
  TORCH_CHECK_VALUE(l.dim() == 2 && l.size(0) == M, "l must be [", M, ", r], got shape ", l.sizes());
  const int64_t r = l.size(1);
  Tensor ll = f32(l, "l", {M, r});
  MaskOf mk = mask_of(mask, M, C, "mask");
  ReduceArgs a{};
  a.streams = 1;
  a.x[0] = xr.rows;
  a.l[0] = ll.data_ptr<float>();
  a.mask[0] = mk.mask;
  a.dtype = dtype_of(x, "x");
  a.keep_scale = static_cast<float>(keep_scale);
  a.cols = C;
  a.r = r;
  RowsOf xr2;
  Tensor ll2;
  MaskOf mk2;
  TORCH_CHECK_VALUE(l2.has_value() == x2.has_value(), "l2 and x2 go together");
  if (x2.has_value()) {
    xr2 = rows_of(*x2, "x2");
    TORCH_CHECK_TYPE(x2->scalar_type() == x.scalar_type(), "x2 dtype ", x2->scalar_type(), " differs from x dtype ",
                     x.scalar_type());
    TORCH_CHECK_VALUE(x2->size(1) == C, "x2 has ", x2->size(1), " columns, x has ", C);
    ll2 = f32(*l2, "l2", {x2->size(0), r});
    mk2 = mask_of(mask2, x2->size(0), C, "mask2");
    a.streams = 2;
    a.x[1] = xr2.rows;
    a.l[1] = ll2.data_ptr<float>();
    a.mask[1] = mk2.mask;
  }
  Tensor out = at::zeros({r, C}, x.options().dtype(at::kFloat));
  a.out = out.data_ptr<float>();
  if (r > 0 && C > 0) table().rank_reduce(kRuntime, a);
  return out;
}

std::string isa() { return table().name; }
std::vector<std::string> supported() { return supported_isas(); }
std::vector<std::string> built() { return built_isas(); }
std::string select_isa(const std::string& name) {
  try {
    return set_isa(name);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}
std::string build_info() { return std::string("torch=") + FLARE_TORCH_VERSION + ";flags=" + FLARE_BUILD_FLAGS; }

}  // namespace
}  // namespace flare_native

#define FLARE_WEIGHT_SCHEMA \
  "Tensor packed, Tensor absmax, Tensor code, Tensor? nested_absmax, Tensor? nested_code, Tensor? nested_offset"

TORCH_LIBRARY(flare_kernels_cpu, m) {
  using namespace flare_native;
  m.def("dequantize(" FLARE_WEIGHT_SCHEMA ", int out_features, int in_features, int blocksize, ScalarType dtype) -> Tensor");
  m.def("linear(Tensor x, Tensor? source, " FLARE_WEIGHT_SCHEMA
        ", int out_features, int blocksize, Tensor? bias, Tensor? z, Tensor? lora_B, float scaling, "
        "Tensor? s_source=None, int fusion=0) -> (Tensor, Tensor)");
  m.def("linear_dx(Tensor dy, " FLARE_WEIGHT_SCHEMA
        ", int out_features, int in_features, int blocksize, Tensor? ds, Tensor? lora_A, Tensor? mask, "
        "float keep_scale) -> Tensor");
  m.def("lora_down(Tensor x, Tensor v, Tensor? mask, Tensor? x2, Tensor? mask2, float keep_scale, float out_scale) "
        "-> (Tensor, Tensor)");
  m.def("rank_reduce(Tensor l, Tensor x, Tensor? mask, Tensor? l2, Tensor? x2, Tensor? mask2, float keep_scale) -> Tensor");
  m.def("isa() -> str", &isa);
  m.def("supported_isas() -> str[]", &supported);
  m.def("built_isas() -> str[]", &built);
  m.def("set_isa(str name) -> str", &select_isa);
  m.def("build_info() -> str", &build_info);
}

TORCH_LIBRARY_IMPL(flare_kernels_cpu, CPU, m) {
  using namespace flare_native;
  m.impl("dequantize", &dequantize);
  m.impl("linear", &linear);
  m.impl("linear_dx", &linear_dx);
  m.impl("lora_down", &lora_down);
  m.impl("rank_reduce", &rank_reduce);
}
