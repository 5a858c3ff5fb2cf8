// AVX-512 (F, BW, VL, DQ): 16 fp32 lanes, 32 zmm registers: micro-tile 4 x-rows x 4 W-rows.
// The 16-entry NF4 table fits one register: a lookup is one vpermps.
struct VAvx512 {
  static constexpr const char* kName = "avx512";
  static constexpr int W = 16;
  static constexpr int MR = 4;
  static constexpr int NR = 4;
  using F = __m512;
  struct Lut {
    __m512 v;
  };

  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static float hsum(F v) {
    __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }

  static F load_act(const void* p, int64_t i, DType dt) {
    if (dt == kF32) return _mm512_loadu_ps(static_cast<const float*>(p) + i);
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
    if (dt == kF16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static F load_keep(const uint8_t* m, float keep) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m)));
    return _mm512_maskz_mov_ps(_mm512_test_epi32_mask(b, b), _mm512_set1_ps(keep));
  }

  static F round_lanes(F v, DType dt) {
    if (dt == kF16) return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    if (dt == kBF16) {
      const __m512i u = _mm512_castps_si512(v);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
      const __m512i quiet = _mm512_or_si512(u, _mm512_set1_epi32(0x400000));
      r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), quiet);
      return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
    }
    return v;
  }
  static Lut make_lut(const float* code, float scale, DType dt) {
    return Lut{round_lanes(_mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(scale)), dt)};
  }
  static void dequant_chunk(const uint8_t* bytes, const Lut& lut, float* out) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
    _mm512_storeu_ps(out, _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), lut.v));
    _mm512_storeu_ps(out + 16, _mm512_permutexvar_ps(_mm512_and_si512(b, _mm512_set1_epi32(0xf)), lut.v));
  }
};
