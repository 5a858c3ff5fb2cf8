// Helpers shared by every ISA file. Include inside an anonymous namespace (internal linkage: each
// ISA file gets its own copy compiled with its own flags), after flare_native.h, <atomic> and
// <cstring>.
//
// Built with -ffp-contract=off: scale() must round the product and the sum separately, exactly
// as bitsandbytes computes the nested absmax, so no multiply-add may be fused by the compiler.

using namespace flare_native;

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// fp32 -> bf16, round to nearest even (as torch and bitsandbytes round), NaN stays NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

// fp32 -> fp16, round to nearest even, with subnormals, overflow to inf, NaN kept.
inline uint16_t f32_to_f16(float f) {
  uint32_t u = f32_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  if (u >= 0x7f800000u) return static_cast<uint16_t>(sign | (u > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (u >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (u < 0x38800000u) {
    // Below 2^-14: a subnormal half, value * 2^24 rounded to an integer (exact scaling, then the
    // 2^23 trick rounds to nearest even in fp32 arithmetic; the result may carry to 0x400 = 2^-14).
    const float scaled = bits_f32(u) * 16777216.0f;
    volatile float t = scaled + 8388608.0f;  // volatile: keep the two roundings apart
    const float r = t - 8388608.0f;
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(r));
  }
  u -= 0x38000000u;  // rebias the exponent 127 -> 15
  u += 0xfffu + ((u >> 13) & 1u);
  return static_cast<uint16_t>(sign | (u >> 13));
}
inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0) {
    const float v = static_cast<float>(man) * 5.9604644775390625e-8f;  // man * 2^-24, exact
    return bits_f32(f32_bits(v) | sign);
  }
  if (exp == 31) return bits_f32(sign | 0x7f800000u | (man << 13));
  return bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

// Round an fp32 value to `dt` and back (the value bitsandbytes produces in that dtype).
inline float round_to(float v, DType dt) {
  if (dt == kBF16) return bf16_to_f32(f32_to_bf16(v));
  if (dt == kF16) return f16_to_f32(f32_to_f16(v));
  return v;
}

inline float load_scalar(const void* p, int64_t i, DType dt) {
  if (dt == kF32) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  return dt == kBF16 ? bf16_to_f32(h) : f16_to_f32(h);
}

inline void store_scalar(void* p, int64_t i, float v, DType dt) {
  if (dt == kF32) {
    static_cast<float*>(p)[i] = v;
  } else {
    static_cast<uint16_t*>(p)[i] = dt == kBF16 ? f32_to_bf16(v) : f32_to_f16(v);
  }
}

inline int64_t elem_size(DType dt) { return dt == kF32 ? 4 : 2; }

inline const char* row_ptr(const Rows& rows, int64_t i, DType dt) {
  return static_cast<const char*>(rows.data) + i * rows.stride * elem_size(dt);
}

// Row i of the streams taken one after the other (stream 0's rows, then stream 1's, ...).
inline const char* stream_row(const Rows* streams, int64_t i, DType dt) {
  int s = 0;
  while (i >= streams[s].count) i -= streams[s++].count;
  return row_ptr(streams[s], i, dt);
}

// The fp32 scale of quantization block b.
inline float block_scale(const NF4& w, int64_t b) {
  if (w.absmax_u8 == nullptr) return w.absmax_f32[b];
  const float product = w.nested_code[w.absmax_u8[b]] * w.nested_absmax[b >> 8];
  return product + w.nested_offset;
}

// The 4-bit code of flat element i.
inline int nibble(const NF4& w, int64_t i) {
  const uint8_t byte = w.packed[i >> 1];
  return (i & 1) ? (byte & 0xf) : (byte >> 4);
}

// W[n, k] in fp32 after rounding to dt: the slow, fully general path (any shape, any block).
inline float element(const NF4& w, int64_t n, int64_t k, DType dt) {
  const int64_t i = n * w.K + k;
  return round_to(w.code[nibble(w, i)] * block_scale(w, i >> w.log2_bs), dt);
}

// Kernels pair the two values of a byte: within a chunk of `chunk` values, the even positions go
// to the first half and the odd ones to the second ("split" order), so one byte load feeds the
// same lane of two vectors. Activations are packed in the same order; dot products do not care.
inline int64_t split_pos(int64_t e, int64_t chunk) { return (e & 1) ? chunk / 2 + (e >> 1) : (e >> 1); }

// Memory that the ISA code owns (C allocation functions only: no shared inline templates).
struct Buffer {
  void* ptr = nullptr;
  explicit Buffer(size_t bytes) {
    const size_t size = round_up(static_cast<int64_t>(bytes ? bytes : 64), 64);
    ptr = std::aligned_alloc(64, size);
    if (ptr == nullptr) throw std::bad_alloc();
  }
  ~Buffer() { std::free(ptr); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  template <class T>
  T* as() const {
    return static_cast<T*>(ptr);
  }
};

template <class F>
void call_body(void* ctx, int64_t b, int64_t e) {
  (*static_cast<F*>(ctx))(b, e);
}

// parallel(rt, 0, n, grain, [&](int64_t b, int64_t e) { ... })
template <class F>
void parallel(const Runtime& rt, int64_t begin, int64_t end, int64_t grain, F&& body) {
  if (end <= begin) return;
  using Fn = typename std::remove_reference<F>::type;
  rt.parallel_for(begin, end, grain, &call_body<Fn>, static_cast<void*>(&body));
}

// Items 0 .. end handed out on demand, `step` at a time: Claims::next gives the calling worker the
// next unclaimed range [b, e), false once none is left.
class Claims {
 public:
  Claims(int64_t end, int64_t step) : end_(end), step_(step) {}
  bool next(int64_t& b, int64_t& e) {
    b = next_.fetch_add(step_, std::memory_order_relaxed);
    if (b >= end_) return false;
    e = imin(b + step_, end_);
    return true;
  }

 private:
  std::atomic<int64_t> next_{0};
  const int64_t end_, step_;
};

// parallel_claim(rt, n, [&](Claims& c) { Buffer scratch(..); for (b, e; c.next(b, e);) { ... } })
// Each worker thread runs `worker` once and claims pieces of about n / 64 items until none are left.
// A static split waits for its slowest half, and on a shared VM a thread loses its vCPU often. The
// 4096 x 4096 decode row-dot on this 2-vCPU VM (2 threads, C++ harness, medians of 25 alternated
// runs of 20 calls): 1.63 ms split in halves vs 1.32 ms claimed; with a busy loop on one vCPU,
// 2.36 vs 2.09 ms. The fastest runs (about 0.9 ms) are the same either way.
template <class F>
void parallel_claim(const Runtime& rt, int64_t end, F&& worker) {
  if (end <= 0) return;
  const int64_t step = imax(1, end / 64);
  Claims claims(end, step);
  parallel(rt, 0, ceil_div(end, step), 1, [&](int64_t, int64_t) { worker(claims); });
}
