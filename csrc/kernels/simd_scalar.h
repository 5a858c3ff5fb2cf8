// Portable "vector" of one float: the scalar path (any CPU, including aarch64). The compiler may
// still vectorize the loops with the baseline instruction set.
struct VScalar {
  static constexpr const char* kName = "scalar";
  static constexpr int W = 1;   // lanes
  static constexpr int MR = 4;  // rows of x per micro-tile
  static constexpr int NR = 4;  // rows of W per micro-tile
  using F = float;
  struct Lut {
    float v[16];
  };

  static F zero() { return 0.0f; }
  static F set1(float v) { return v; }
  static F load(const float* p) { return *p; }
  static void store(float* p, F v) { *p = v; }
  static F add(F a, F b) { return a + b; }
  static F mul(F a, F b) { return a * b; }
  static F fma(F a, F b, F c) { return a * b + c; }  // two roundings (-ffp-contract=off)
  static float hsum(F v) { return v; }

  // W activations (any dtype) as fp32.
  static F load_act(const void* p, int64_t i, DType dt) { return load_scalar(p, i, dt); }
  // keep-mask lanes: (mask != 0) * keep for W bytes.
  static F load_keep(const uint8_t* m, float keep) { return *m ? keep : 0.0f; }

  static Lut make_lut(const float* code, float scale, DType dt) {
    Lut l;
    for (int i = 0; i < 16; ++i) l.v[i] = round_to(code[i] * scale, dt);
    return l;
  }
  // One chunk of 2W values from W bytes, in split order: out[0] = high nibble, out[1] = low.
  static void dequant_chunk(const uint8_t* bytes, const Lut& lut, float* out) {
    out[0] = lut.v[bytes[0] >> 4];
    out[1] = lut.v[bytes[0] & 0xf];
  }
};
