// AVX2 + FMA + F16C: 8 fp32 lanes. 16 ymm registers: micro-tile 2 x-rows x 4 W-rows = 8
// accumulators + 4 weight vectors + 1 activation vector.
struct VAvx2 {
  static constexpr const char* kName = "avx2";
  static constexpr int W = 8;
  static constexpr int MR = 2;
  static constexpr int NR = 4;
  using F = __m256;
  struct Lut {
    __m256 lo, hi;  // entries 0..7 and 8..15
  };

  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static float hsum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }

  static F load_act(const void* p, int64_t i, DType dt) {
    if (dt == kF32) return _mm256_loadu_ps(static_cast<const float*>(p) + i);
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
    if (dt == kF16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static F load_keep(const uint8_t* m, float keep) {
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m)));
    const __m256 dropped = _mm256_castsi256_ps(_mm256_cmpeq_epi32(b, _mm256_setzero_si256()));
    return _mm256_andnot_ps(dropped, _mm256_set1_ps(keep));
  }

  static F round_lanes(F v, DType dt) {
    if (dt == kF16) return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    if (dt == kBF16) {
      const __m256i u = _mm256_castps_si256(v);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
      r = _mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xffff0000u)));
      const __m256i quiet = _mm256_and_si256(_mm256_or_si256(u, _mm256_set1_epi32(0x400000)),
                                             _mm256_set1_epi32(static_cast<int>(0xffff0000u)));
      const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
      return _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(quiet), nan);
    }
    return v;
  }
  static Lut make_lut(const float* code, float scale, DType dt) {
    const __m256 s = _mm256_set1_ps(scale);
    return Lut{round_lanes(_mm256_mul_ps(_mm256_loadu_ps(code), s), dt),
               round_lanes(_mm256_mul_ps(_mm256_loadu_ps(code + 8), s), dt)};
  }
  static F lookup(const Lut& lut, __m256i idx) {
    const __m256 lo = _mm256_permutevar8x32_ps(lut.lo, idx);
    const __m256 hi = _mm256_permutevar8x32_ps(lut.hi, idx);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));  // bit 3 -> sign
  }
  static void dequant_chunk(const uint8_t* bytes, const Lut& lut, float* out) {
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
    _mm256_storeu_ps(out, lookup(lut, _mm256_srli_epi32(b, 4)));
    _mm256_storeu_ps(out + 8, lookup(lut, _mm256_and_si256(b, _mm256_set1_epi32(0xf))));
  }
};
