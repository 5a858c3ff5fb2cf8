// bf16 activations on AVX512-BF16: weights dequantized straight to bf16 (one vpermw per 32
// values, the 16-entry table of each block held as 16-bit words) and multiplied with vdpbf16ps
// (pairs of bf16 products summed into fp32 lanes: 32 MACs per instruction, twice the fp32 FMA).
// Include inside an anonymous namespace after kernels_f32.h (uses VAvx512 and finish_rows).
//
// Chunks are 64 values (32 bytes of one row); "split" order puts the 32 high nibbles (even k)
// before the 32 low nibbles (odd k). vdpbf16ps pairs neighbouring words, so packed activations
// use the same order.

inline __mmask16 lanes16(int64_t valid) {
  return valid >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (valid > 0 ? valid : 0)) - 1u);
}

// bf16 table of the blocks of a chunk's two halves: words 0..15 for half 0, 16..31 for half 1.
// vcvtne2ps2bf16 rounds to nearest even but flushes subnormal inputs to zero, so scales small
// enough to give a subnormal product (|s| < 2^-122, never seen in a real weight) take the exact
// integer rounding instead (see tiny_scale).
inline __m512i bf16_lut2(__m512 code, float s0, float s1) {
  return (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(code, _mm512_set1_ps(s1)), _mm512_mul_ps(code, _mm512_set1_ps(s0)));
}
inline bool tiny_scale(float s) { return s != 0.0f && s < 1.9e-37f && s > -1.9e-37f; }
inline __m512i bf16_lut2_exact(__m512 code, float s0, float s1) {
  const __m512i r0 = _mm512_srli_epi32(_mm512_castps_si512(VAvx512::round_lanes(_mm512_mul_ps(code, _mm512_set1_ps(s0)), kBF16)), 16);
  const __m512i r1 = _mm512_srli_epi32(_mm512_castps_si512(VAvx512::round_lanes(_mm512_mul_ps(code, _mm512_set1_ps(s1)), kBF16)), 16);
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(r0)), _mm512_cvtepi32_epi16(r1), 1);
}

// Which words of the 32-word table a chunk's 4-bit codes index: kLower, words 0-15 (one table;
// a blocksize >= 64 table fills both halves); kHalves, the first 32 values of the chunk words
// 0-15 and the last 32 words 16-31 (blocksize 32); kUpper, words 16-31 (the second chunk of a
// pair whose two tables share one register).
enum TableWords { kLower, kHalves, kUpper };

// 32 bytes -> 64 bf16 values: E = even k (high nibbles), O = odd k (low nibbles).
template <TableWords WORDS>
inline void dequant64_bf16(const uint8_t* bytes, __m512i lut, __m512i& even, __m512i& odd) {
  const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)));
  const __m512i low4 = _mm512_set1_epi16(0xf);
  __m512i hi = _mm512_srli_epi16(w, 4), lo;
  if (WORDS == kLower) {
    lo = _mm512_and_si512(w, low4);
  } else {
    const __m512i plus16 = WORDS == kUpper ? _mm512_set1_epi16(16)
                                           : _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(16), 1);
    hi = _mm512_or_si512(hi, plus16);
    lo = _mm512_ternarylogic_epi32(plus16, w, low4, 0xf8);  // (w AND 0xf) OR plus16: imm = A | (B & C)
  }
  even = _mm512_permutexvar_epi16(hi, lut);
  odd = _mm512_permutexvar_epi16(lo, lut);
}

// One block's table in both halves (blocksize >= 64).
inline __m512i bf16_lut1(__m512 code, float s) {
  const __m512 v = _mm512_mul_ps(code, _mm512_set1_ps(s));
  return (__m512i)_mm512_cvtne2ps_pbh(v, v);
}

// fp32 scales of blocks b0 .. b0 + nb (16 per step: a gather from the nested code map, one
// multiply, one add, rounded separately as bitsandbytes does). Returns whether any scale is so
// small that its table needs the exact rounding (see bf16_lut2).
inline bool block_scales(const NF4& w, int64_t b0, int64_t nb, float* out) {
  const __m512 tiny = _mm512_set1_ps(1.9e-37f);
  __mmask16 small = 0;
  for (int64_t j = 0; j < nb; j += 16) {
    const __mmask16 m = lanes16(nb - j);
    __m512 s;
    if (w.absmax_u8 != nullptr) {
      const __m512i qa = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, w.absmax_u8 + b0 + j));
      const __m512 c = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, qa, w.nested_code, 4);
      // 16 blocks span at most two nested groups of 256: two broadcasts, not a gather.
      const int64_t g0 = (b0 + j) >> 8, g1 = (b0 + j + imin(15, nb - j - 1)) >> 8;
      __m512 na = _mm512_set1_ps(w.nested_absmax[g0]);
      if (g1 != g0)
        na = _mm512_mask_mov_ps(na, static_cast<__mmask16>(0xffffu << ((g1 << 8) - (b0 + j))),
                                _mm512_set1_ps(w.nested_absmax[g1]));
      s = _mm512_add_ps(_mm512_mul_ps(c, na), _mm512_set1_ps(w.nested_offset));
    } else {
      s = _mm512_maskz_loadu_ps(m, w.absmax_f32 + b0 + j);
    }
    _mm512_mask_storeu_ps(out + j, m, s);
    const __m512 mag = _mm512_abs_ps(s);
    small |= _mm512_mask_cmp_ps_mask(m, mag, tiny, _CMP_LT_OQ) & _mm512_mask_cmp_ps_mask(m, mag, _mm512_setzero_ps(), _CMP_GT_OQ);
  }
  return small != 0;
}

// W[n, k0 .. k0 + len) (len a multiple of 64) as bf16 bits: for chunk c, the even-k words go to
// out + c * chunk_stride and the odd-k words to out + c * chunk_stride + odd_offset.
inline void dequant_bf16(const NF4& w, int64_t n, int64_t k0, int64_t len, uint16_t* out, int64_t chunk_stride,
                         int64_t odd_offset) {
  constexpr int64_t kSeg = 4096;  // values per batch of precomputed scales
  float sc[kSeg / 32 + 2];
  const int64_t K = w.K, row = n * K;
  const int L = w.log2_bs;
  const __m512 code = _mm512_loadu_ps(w.code);
  for (int64_t s0 = 0; s0 < len; s0 += kSeg) {
    const int64_t seg = imin(kSeg, len - s0);
    const int64_t f = row + k0 + s0;
    uint16_t* base = out + (s0 / 64) * chunk_stride;
    // Full chunks starting 32-aligned lie in one block per half: the vector path.
    const int64_t fast = (f & 31) == 0 ? imax(0, imin(seg, K - k0 - s0)) / 64 : 0;
    const int64_t b0 = f >> L;
    const bool exact = fast > 0 && block_scales(w, b0, ((f + 64 * fast - 1) >> L) - b0 + 1, sc);
    int64_t c = 0;
    if (L >= 6 && !exact && (f & 63) == 0) {
      // Whole blocks of BS / 64 chunks: one table per block, then a tight loop over its chunks.
      const int64_t per = int64_t(1) << (L - 6);
      int64_t in_block = (f & ((int64_t(1) << L) - 1)) >> 6;
      const uint8_t* src = w.packed + (f >> 1);
      uint16_t* dst = base;
      for (int64_t blk = 0; c < fast; ++blk, in_block = 0) {
        const __m512i lut = bf16_lut1(code, sc[blk]);
        const int64_t cnt = imin(per - in_block, fast - c);
        for (int64_t j = 0; j < cnt; ++j, src += 32, dst += chunk_stride) {
          __m512i e, o;
          dequant64_bf16<kLower>(src, lut, e, o);
          _mm512_storeu_si512(dst, e);
          _mm512_storeu_si512(dst + odd_offset, o);
        }
        c += cnt;
      }
    }
    for (; c < fast; ++c) {
      const float h0 = sc[((f + 64 * c) >> L) - b0], h1 = sc[((f + 64 * c + 32) >> L) - b0];
      const __m512i lut = exact ? bf16_lut2_exact(code, h0, h1) : bf16_lut2(code, h0, h1);
      __m512i e, o;
      dequant64_bf16<kHalves>(w.packed + ((f + c * 64) >> 1), lut, e, o);
      _mm512_storeu_si512(base + c * chunk_stride, e);
      _mm512_storeu_si512(base + c * chunk_stride + odd_offset, o);
    }
    for (; c * 64 < seg; ++c) {  // across a block boundary inside a half, an odd row start, or past K
      uint16_t* even = base + c * chunk_stride;
      uint16_t* odd = even + odd_offset;
      const int64_t k = k0 + s0 + c * 64;
      for (int e = 0; e < 64; ++e) {
        const uint16_t v = k + e < K ? f32_to_bf16(element(w, n, k + e, kBF16)) : 0;
        (e & 1 ? odd : even)[e >> 1] = v;
      }
    }
  }
}

// A row of W prepared for dequantizing chunk ranges repeatedly: its block scales computed once.
// Needs K % 64 == 0 (the row starts 64-aligned, each 32-value half lies in one block).
struct BfRow {
  const uint8_t* bytes;  // the row's first byte
  const float* scale;    // indexed by absolute block
  int64_t f;             // flat index of the row's first value
  bool exact;            // a scale needs the exact rounding (see bf16_lut2)
};

inline BfRow prepare_row(const NF4& w, int64_t n, float* sc) {
  const int64_t f = n * w.K, b0 = f >> w.log2_bs;
  const bool exact = block_scales(w, b0, ((f + w.K - 1) >> w.log2_bs) - b0 + 1, sc);
  return BfRow{w.packed + (f >> 1), sc - b0, f, exact};
}

// Chunks [c0, c1) of a prepared row: chunk c's even-k words to dst + (c - c0) * stride, its odd-k
// words odd_offset further. One table per block when blocks hold whole chunks (blocksize >= 64).
inline void dequant_row_chunks(const BfRow& r, int L, __m512 code, int64_t c0, int64_t c1, uint16_t* dst,
                               int64_t stride, int64_t odd_offset, bool prefetch_next = false) {
  if (prefetch_next) {  // the same range's successor: callers walking 32 rows at once defeat the
                        // hardware prefetcher (the loads stalled 30% of the time without this)
    const char* next = reinterpret_cast<const char*>(r.bytes + 32 * c1);
    for (int64_t off = 0; off < 32 * (c1 - c0); off += 64) _mm_prefetch(next + off, _MM_HINT_T0);
  }
  if (L == 6 && !r.exact) {  // a block per chunk: two tables per vcvtne2ps2bf16 (see gemv_bf16_row)
    int64_t c = c0;
    for (; c + 2 <= c1; c += 2, dst += 2 * stride) {
      const int64_t b = (r.f + 64 * c) >> 6;
      const __m512i lut = bf16_lut2(code, r.scale[b], r.scale[b + 1]);
      __m512i e, o;
      dequant64_bf16<kLower>(r.bytes + 32 * c, lut, e, o);
      _mm512_storeu_si512(dst, e);
      _mm512_storeu_si512(dst + odd_offset, o);
      dequant64_bf16<kUpper>(r.bytes + 32 * c + 32, lut, e, o);
      _mm512_storeu_si512(dst + stride, e);
      _mm512_storeu_si512(dst + stride + odd_offset, o);
    }
    if (c < c1) {
      __m512i e, o;
      dequant64_bf16<kLower>(r.bytes + 32 * c, bf16_lut1(code, r.scale[(r.f + 64 * c) >> 6]), e, o);
      _mm512_storeu_si512(dst, e);
      _mm512_storeu_si512(dst + odd_offset, o);
    }
    return;
  }
  if (L >= 6 && !r.exact) {
    int64_t block = -1;
    __m512i lut = _mm512_setzero_si512();
    for (int64_t c = c0; c < c1; ++c, dst += stride) {
      const int64_t b = (r.f + 64 * c) >> L;
      if (b != block) {
        lut = bf16_lut1(code, r.scale[b]);
        block = b;
      }
      __m512i e, o;
      dequant64_bf16<kLower>(r.bytes + 32 * c, lut, e, o);
      _mm512_storeu_si512(dst, e);
      _mm512_storeu_si512(dst + odd_offset, o);
    }
    return;
  }
  for (int64_t c = c0; c < c1; ++c, dst += stride) {
    const int64_t fc = r.f + 64 * c;
    const float h0 = r.scale[fc >> L], h1 = r.scale[(fc + 32) >> L];
    const __m512i lut = r.exact ? bf16_lut2_exact(code, h0, h1) : bf16_lut2(code, h0, h1);
    __m512i e, o;
    dequant64_bf16<kHalves>(r.bytes + 32 * c, lut, e, o);
    _mm512_storeu_si512(dst, e);
    _mm512_storeu_si512(dst + odd_offset, o);
  }
}

inline void dequantize_bf16(const Runtime& rt, const NF4& w, void* out) {
  const int64_t K = w.K, Kp = round_up(K, 64);
  parallel(rt, 0, w.N, 16, [&](int64_t nb, int64_t ne) {
    Buffer tmp(Kp * 2);
    uint16_t* t = tmp.as<uint16_t>();
    uint16_t* o = static_cast<uint16_t*>(out);
    for (int64_t n = nb; n < ne; ++n) {
      dequant_bf16(w, n, 0, Kp, t, 64, 32);
      for (int64_t k = 0; k < K; ++k) o[n * K + k] = t[k / 64 * 64 + split_pos(k % 64, 64)];
    }
  });
}

// 64 bf16 activations (natural order, `valid` of them real) -> split order.
inline void split64_bf16(const uint16_t* src, int64_t valid, __m512i& even, __m512i& odd) {
  const __mmask64 m = valid >= 64 ? ~__mmask64(0) : ((__mmask64(1) << valid) - 1);
  const __m512i a = _mm512_maskz_loadu_epi16(static_cast<__mmask32>(m), src);
  const __m512i b = _mm512_maskz_loadu_epi16(static_cast<__mmask32>(m >> 32), src + 32);
  alignas(64) static const uint16_t kEven[32] = {0,  2,  4,  6,  8,  10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
                                                 32, 34, 36, 38, 40, 42, 44, 46, 48, 50, 52, 54, 56, 58, 60, 62};
  const __m512i ie = _mm512_load_si512(kEven);
  even = _mm512_permutex2var_epi16(a, ie, b);
  odd = _mm512_permutex2var_epi16(a, _mm512_add_epi16(ie, _mm512_set1_epi16(1)), b);
}

// vdpbf16ps row-dot: same structure as linear_f (kernels_f32.h) with bf16 buffers.
template <int MRt>
void rowdot_tile_bf16(const uint16_t* xp, int64_t Kp, const uint16_t* wb, const LinearArgs& a, const LoraPad& lp,
                      int64_t m0, int64_t n0, int64_t nr) {
  constexpr int NR = VAvx512::NR;
  __m512 acc[MRt][NR];
  for (int m = 0; m < MRt; ++m)
    for (int i = 0; i < NR; ++i) acc[m][i] = _mm512_setzero_ps();
  const uint16_t* x0 = xp + m0 * Kp;
  for (int64_t k = 0; k < Kp; k += 32) {
    __m512i wv[NR];
    for (int i = 0; i < NR; ++i) wv[i] = _mm512_loadu_si512(wb + i * Kp + k);
    for (int m = 0; m < MRt; ++m) {
      const __m512i xv = _mm512_loadu_si512(x0 + m * Kp + k);
      for (int i = 0; i < NR; ++i)
        acc[m][i] = _mm512_dpbf16_ps(acc[m][i], (__m512bh)xv, (__m512bh)wv[i]);
    }
  }
  finish_rows<VAvx512, MRt>(acc, a, lp, m0, n0, nr);
}

// Activation rows (bf16) in split order, zero-padded to Kp (a multiple of 64).
inline void pack_split_bf16(const Runtime& rt, const Rows* streams, int nstreams, int64_t K, int64_t Kp,
                            uint16_t* out) {
  int64_t rows = 0;
  for (int s = 0; s < nstreams; ++s) rows += streams[s].count;
  parallel(rt, 0, rows, 8, [&](int64_t rb, int64_t re) {
    for (int64_t i = rb; i < re; ++i) {
      const uint16_t* src = reinterpret_cast<const uint16_t*>(stream_row(streams, i, kBF16));
      for (int64_t k0 = 0; k0 < Kp; k0 += 64) {
        __m512i e, o;
        split64_bf16(src + k0, imin(64, imax(0, K - k0)), e, o);
        _mm512_storeu_si512(out + i * Kp + k0, e);
        _mm512_storeu_si512(out + i * Kp + k0 + 32, o);
      }
    }
  });
}

// Few rows (decode): dequantize each chunk of a row of W in registers and feed it straight to
// the dot, no weight buffer. Rows of W are walked one after the other, so each thread reads one
// sequential stream. K % 64 == 0 (every real model); other shapes take the buffer path.
// ONE_BLOCK: blocksize >= 64, both halves of a chunk share one scale.
//
// On the 2-core AVX512-BF16 machine this was tuned on, the loop is bound by vector instructions,
// not by reading the 4-bit weights (a row-dot over an L2-resident weight costs as much per chunk
// as one streamed from memory), and a vdpbf16ps costs about four fp32 FMAs. So:
//  * two chunks share one vcvtne2ps2bf16 (their two 16-word tables in one register; the second
//    chunk's indices get +16);
//  * from two rows on (FLARE decode: target + source), the dequantized bf16 words are widened to
//    fp32 (a shift and a mask per 16 values, once per chunk) and every row takes four FMAs per
//    chunk instead of two vdpbf16ps. Activations then come as fp32 in "quad" order (see
//    pack_quad_f32). Products of bf16 values are exact in fp32 either way.
// Medians of interleaved runs, 4096 x 4096, one core, kernels alone (an uncommitted C++ harness;
// the reproducible figures are `python -m benchmarks.cpu_native`): 1.70 vs 1.78 ms at one row,
// 2.18 vs 2.45 ms at two rows (the single-table vdpbf16ps loop before).
template <int MRt, bool ONE_BLOCK, bool F32>
void gemv_bf16_row(const uint16_t* xp, const float* xq, int64_t Kp, const LinearArgs& a, const LoraPad& lp, int64_t n,
                   float* sc) {
  const NF4& w = a.w;
  const int64_t K = w.K, f = n * K;
  const int L = w.log2_bs;
  const __m512 code = _mm512_loadu_ps(w.code);
  const uint8_t* bytes = w.packed + (f >> 1);
  const int64_t b0 = f >> L;
  const bool exact = block_scales(w, b0, ((f + K - 1) >> L) - b0 + 1, sc);
  const float* scale = sc - b0;  // indexed by absolute block
  const bool paired = ONE_BLOCK && !exact;
  // Four independent chains per row: vdpbf16ps and FMA latencies are several cycles, and one
  // chain per row made the loop latency-bound.
  __m512 acc[MRt][4];
  for (int m = 0; m < MRt; ++m)
    for (int i = 0; i < 4; ++i) acc[m][i] = _mm512_setzero_ps();
  const __m512i high_words = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  auto dot = [&](int64_t c, int u, __m512i e, __m512i o) {
    if (F32) {
      // Lanes of the widened words, in the quad order of the activations: k = 4j, 4j + 2
      // (even words of e, odd words of e), 4j + 1, 4j + 3 (the same of o).
      const __m512 w0 = _mm512_castsi512_ps(_mm512_slli_epi32(e, 16));
      const __m512 w1 = _mm512_castsi512_ps(_mm512_and_si512(e, high_words));
      const __m512 w2 = _mm512_castsi512_ps(_mm512_slli_epi32(o, 16));
      const __m512 w3 = _mm512_castsi512_ps(_mm512_and_si512(o, high_words));
      for (int m = 0; m < MRt; ++m) {
        const float* xr = xq + m * Kp + 64 * c;
        acc[m][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xr), w0, acc[m][0]);
        acc[m][1] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + 16), w1, acc[m][1]);
        acc[m][2] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + 32), w2, acc[m][2]);
        acc[m][3] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + 48), w3, acc[m][3]);
      }
    } else {
      for (int m = 0; m < MRt; ++m) {
        const uint16_t* xr = xp + m * Kp + 64 * c;
        acc[m][2 * u] = _mm512_dpbf16_ps(acc[m][2 * u], (__m512bh)_mm512_loadu_si512(xr), (__m512bh)e);
        acc[m][2 * u + 1] = _mm512_dpbf16_ps(acc[m][2 * u + 1], (__m512bh)_mm512_loadu_si512(xr + 32), (__m512bh)o);
      }
    }
  };
  auto single = [&](int64_t c, int u) {  // one chunk with its own table
    const int64_t fc = f + 64 * c;
    __m512i lut;
    if (paired) {
      lut = bf16_lut1(code, scale[fc >> L]);
    } else {
      const float h0 = scale[fc >> L], h1 = scale[(fc + 32) >> L];
      lut = exact ? bf16_lut2_exact(code, h0, h1) : bf16_lut2(code, h0, h1);
    }
    __m512i e, o;
    dequant64_bf16<ONE_BLOCK ? kLower : kHalves>(bytes + 32 * c, lut, e, o);
    dot(c, u, e, o);
  };
  const int64_t chunks = K / 64;
  int64_t c = 0;
  for (; c + 2 <= chunks; c += 2) {
    _mm_prefetch(reinterpret_cast<const char*>(bytes + 32 * c + 1024), _MM_HINT_T0);
    if (!paired) {
      single(c, 0);
      single(c + 1, 1);
      continue;
    }
    const int64_t fc = f + 64 * c;
    const __m512i lut = bf16_lut2(code, scale[fc >> L], scale[(fc + 64) >> L]);  // words 0-15, 16-31
    __m512i e, o;
    dequant64_bf16<kLower>(bytes + 32 * c, lut, e, o);
    dot(c, 0, e, o);
    dequant64_bf16<kUpper>(bytes + 32 * c + 32, lut, e, o);
    dot(c + 1, 1, e, o);
  }
  if (c < chunks) single(c, 0);
  __m512 out[MRt][1];
  for (int m = 0; m < MRt; ++m)
    out[m][0] = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3]));
  finish_rows<VAvx512, MRt, 1>(out, a, lp, 0, n, 1);
}

template <int MRt, bool F32>
void gemv_bf16(const uint16_t* xp, const float* xq, int64_t Kp, const LinearArgs& a, const LoraPad& lp, int64_t n0,
               int64_t nr, float* sc) {
  for (int64_t n = n0; n < n0 + nr; ++n) {
    if (a.w.log2_bs >= 6) {
      gemv_bf16_row<MRt, true, F32>(xp, xq, Kp, a, lp, n, sc);
    } else {
      gemv_bf16_row<MRt, false, F32>(xp, xq, Kp, a, lp, n, sc);
    }
  }
}

// Split-order bf16 rows (pack_split_bf16) -> fp32 in quad order: per 64-value chunk, the lanes of
// k = 4j, 4j + 2, 4j + 1, 4j + 3 (j = 0..15), the order gemv_bf16_row widens weight words in.
inline void pack_quad_f32(const uint16_t* xp, int64_t rows, int64_t Kp, float* out) {
  const __m512i high_words = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t i = 0; i < rows * Kp; i += 64) {
    const __m512i e = _mm512_loadu_si512(xp + i), o = _mm512_loadu_si512(xp + i + 32);
    _mm512_storeu_si512(out + i, _mm512_slli_epi32(e, 16));
    _mm512_storeu_si512(out + i + 16, _mm512_and_si512(e, high_words));
    _mm512_storeu_si512(out + i + 32, _mm512_slli_epi32(o, 16));
    _mm512_storeu_si512(out + i + 48, _mm512_and_si512(o, high_words));
  }
}

inline void linear_bf16(const Runtime& rt, const LinearArgs& a) {
  constexpr int NR = VAvx512::NR, MR = VAvx512::MR;
  const int64_t K = a.w.K, N = a.w.N, Kp = round_up(K, 64);
  const int64_t rows = a.x[0].count + a.x[1].count;
  Buffer xbuf(rows * Kp * 2);
  uint16_t* xp = xbuf.as<uint16_t>();
  pack_split_bf16(rt, a.x, 2, K, Kp, xp);
  LoraPad lp;
  const bool lora = a.z != nullptr && a.r > 0 && a.x[0].count > 0;
  lp.rw = round_up(a.r, 16);
  Buffer zbuf(lora ? a.x[0].count * lp.rw * 4 : 0), bbuf(lora ? N * lp.rw * 4 : 0);
  if (lora) {
    pad_lora(a, lp.rw, zbuf.as<float>(), bbuf.as<float>());
    lp.zs = zbuf.as<float>();
    lp.bp = bbuf.as<float>();
  }
  const bool gemv = rows <= MR && K % 64 == 0;
  Buffer qbuf(gemv && rows >= 2 ? rows * Kp * 4 : 0);
  float* xq = qbuf.as<float>();
  if (gemv && rows >= 2) pack_quad_f32(xp, rows, Kp, xq);
  parallel_claim(rt, ceil_div(N, NR), [&](Claims& claims) {
    Buffer wbuf(gemv ? ((K >> a.w.log2_bs) + 2) * 4 : NR * Kp * 2);
    uint16_t* wb = wbuf.as<uint16_t>();
    for (int64_t tb, te; claims.next(tb, te);) {
      for (int64_t t = tb; t < te; ++t) {
        const int64_t n0 = t * NR, nr = imin(NR, N - n0);
        if (gemv) {
          float* sc = wbuf.as<float>();
          switch (rows) {
            case 1: gemv_bf16<1, false>(xp, xq, Kp, a, lp, n0, nr, sc); break;
            case 2: gemv_bf16<2, true>(xp, xq, Kp, a, lp, n0, nr, sc); break;
            case 3: gemv_bf16<3, true>(xp, xq, Kp, a, lp, n0, nr, sc); break;
            default: gemv_bf16<4, true>(xp, xq, Kp, a, lp, n0, nr, sc); break;
          }
          continue;
        }
        for (int i = 0; i < NR; ++i) {
          if (i < nr) {
            dequant_bf16(a.w, n0 + i, 0, Kp, wb + i * Kp, 64, 32);
          } else {
            std::memset(wb + i * Kp, 0, Kp * 2);
          }
        }
        int64_t m0 = 0;
        for (; m0 + MR <= rows; m0 += MR) rowdot_tile_bf16<MR>(xp, Kp, wb, a, lp, m0, n0, nr);
        for (; m0 < rows; ++m0) rowdot_tile_bf16<1>(xp, Kp, wb, a, lp, m0, n0, nr);
      }
    }
  });
}
