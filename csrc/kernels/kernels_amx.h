// AMX-BF16 tiles for bf16 activations (Sapphire Rapids and later). Include inside an anonymous
// namespace after kernels_bf16.h.
//
// A tile multiply C[16 x 16 fp32] += A[16 x 32 bf16] B[16 x 16 pairs] takes 16 cycles for 8192
// MACs, 16x vdpbf16ps, so the weights' dequantization, not the dot, bounds small batches.
//
// Forward, C = W x^T (y transposed, so the weights need no transposition): A = 16 rows of W,
// dequantized row by row in split order (a k-step = one half of a 64-value chunk); B =
// activations in "VNNI" form (word pairs along k, 16 rows per tile), packed once per call. Each
// dequantized 32-row block of W serves every row of both streams (or of a 128-row group). The
// epilogue transposes C back (16 x 16 in registers), adds bias and the LoRA up-projection in
// fp32 and rounds once.
//
// dX, C = dy W: A = dy (16 rows x 32 columns, natural layout), B = word pairs of two neighbouring
// rows of W for 16 columns of k (see linear_dx_amx for the blocking).

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// All 8 tiles 16 rows x 64 bytes (a 16 x 16 fp32 or 16 x 32 bf16 tile).
inline void amx_configure() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof cfg);
  cfg.palette_id = 1;
  for (int i = 0; i < 8; ++i) {
    cfg.rows[i] = 16;
    cfg.colsb[i] = 64;
  }
  _tile_loadconfig(&cfg);
}

// In-register transpose of a 16 x 16 matrix of 32-bit values.
inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // u[4g + c], 128-bit lane L = column 4L + c, rows 4g .. 4g + 3.
  for (int c = 0; c < 4; ++c) {
    const __m512i p = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88);
    const __m512i q = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xdd);
    const __m512i p2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
    const __m512i q2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xdd);
    r[c] = _mm512_shuffle_i32x4(p, p2, 0x88);
    r[8 + c] = _mm512_shuffle_i32x4(p, p2, 0xdd);
    r[4 + c] = _mm512_shuffle_i32x4(q, q2, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(q, q2, 0xdd);
  }
}

// fp32 lanes -> bf16 words (round to nearest even), masked store of `valid` of them.
inline void store_bf16(uint16_t* dst, __m512 v, int64_t valid) {
  const __m512i bits = _mm512_srli_epi32(_mm512_castps_si512(VAvx512::round_lanes(v, kBF16)), 16);
  _mm256_mask_storeu_epi16(dst, lanes16(valid), _mm512_cvtepi32_epi16(bits));
}

// ------------------------------------------------------------------------------------ forward
// Activations as B tiles: tile (mt, ks) at out + (mt * KS + ks) * 512 words; row kk holds, for
// each of 16 rows m, the word pair of split positions 2kk, 2kk + 1 of k-step ks (ks = 2c: even
// k of chunk c, ks = 2c + 1: odd k).
inline void pack_vnni_rows(const Runtime& rt, const Rows* streams, int64_t rows, int64_t K, int64_t KS,
                           uint16_t* out) {
  const int64_t MT = ceil_div(rows, 16);
  parallel(rt, 0, MT, 1, [&](int64_t tb, int64_t te) {
    for (int64_t mt = tb; mt < te; ++mt) {
      const uint16_t* src[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t row = mt * 16 + i;
        src[i] = row < rows ? reinterpret_cast<const uint16_t*>(stream_row(streams, row, kBF16)) : nullptr;
      }
      for (int64_t c = 0; c * 2 < KS; ++c) {
        __m512i e[16], o[16];
        const int64_t valid = imin(64, imax(0, K - c * 64));
        for (int i = 0; i < 16; ++i) {
          if (src[i] != nullptr) {
            split64_bf16(src[i] + c * 64, valid, e[i], o[i]);
          } else {
            e[i] = o[i] = _mm512_setzero_si512();
          }
        }
        transpose16(e);
        transpose16(o);
        uint16_t* te_ = out + (mt * KS + 2 * c) * 512;
        for (int kk = 0; kk < 16; ++kk) {
          _mm512_storeu_si512(te_ + kk * 32, e[kk]);
          _mm512_storeu_si512(te_ + 512 + kk * 32, o[kk]);
        }
      }
    }
  });
}

// Epilogue of one C tile (16 rows of W x 16 activation rows, fp32 at c, row stride 16).
inline void amx_fwd_store(const LinearArgs& a, const float* c, int64_t n0, int64_t row0, int64_t rows,
                          const float* bt, int64_t np) {
  const int64_t N = a.w.N, lora_rows = a.x[0].count;
  const int64_t valid_n = N - n0;
  if (valid_n <= 0) return;
  __m512i r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(c + i * 16);
  transpose16(r);
  const __m512 bias = a.bias ? _mm512_maskz_loadu_ps(lanes16(valid_n), a.bias + n0) : _mm512_setzero_ps();
  for (int m = 0; m < 16; ++m) {
    const int64_t row = row0 + m;
    if (row >= rows) break;
    __m512 v = _mm512_add_ps(_mm512_castsi512_ps(r[m]), bias);
    const int s = row < lora_rows ? 0 : 1;
    const int64_t out_row = s ? row - lora_rows : row;
    if (s == 0 && bt != nullptr) {
      for (int64_t j = 0; j < a.r; ++j)
        v = _mm512_fmadd_ps(_mm512_set1_ps(a.scaling * a.z[row * a.r + j]), _mm512_loadu_ps(bt + j * np + n0), v);
    }
    store_bf16(static_cast<uint16_t*>(a.y[s]) + out_row * N + n0, v, valid_n);
  }
}

// Up to 32 rows (one or two row tiles, so the C tiles stay in tile registers): W is dequantized
// one K-chunk of 32 rows at a time into a 16 KiB buffer that the tile loads read from L1, right
// after it was written, instead of a whole 32 x K block from L2.
inline void linear_amx_few(const Runtime& rt, const LinearArgs& a, const uint16_t* xv, int64_t KS, int64_t MT,
                           int64_t rows, const float* bt, int64_t np) {
  constexpr int64_t kKC = 512;  // values of K per chunk: 16 k-steps, a 32 KiB buffer
  const int64_t K = a.w.K, N = a.w.N, nbr = (K >> a.w.log2_bs) + 2;
  const int L = a.w.log2_bs;
  parallel(rt, 0, ceil_div(N, 32), 1, [&](int64_t bb, int64_t be) {
    amx_configure();
    Buffer scbuf(32 * nbr * 4), wbuf(32 * kKC * 2), cbuf(4 * 1024);
    uint16_t* wc = wbuf.as<uint16_t>();
    float* cb = cbuf.as<float>();
    const __m512 code = _mm512_loadu_ps(a.w.code);
    BfRow row[32];
    for (int64_t nb = bb; nb < be; ++nb) {
      const int64_t n0 = nb * 32, valid = imin(32, N - n0);
      for (int i = 0; i < valid; ++i) row[i] = prepare_row(a.w, n0 + i, scbuf.as<float>() + i * nbr);
      if (valid < 32) std::memset(wc, 0, 32 * kKC * 2);
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      const uint16_t* b0 = xv;
      const uint16_t* b1 = xv + KS * 512;
      for (int64_t k0 = 0; k0 < K; k0 += kKC) {
        const int64_t kc = imin(kKC, K - k0), c0 = k0 / 64;
        for (int i = 0; i < valid; ++i)
          dequant_row_chunks(row[i], L, code, c0, c0 + kc / 64, wc + i * kKC, 64, 32, k0 + kc < K);
        for (int64_t j = 0; j < kc / 32; ++j) {
          const int64_t ks = k0 / 32 + j;
          _tile_loadd(4, wc + 32 * j, kKC * 2);
          _tile_loadd(5, wc + 16 * kKC + 32 * j, kKC * 2);
          _tile_loadd(6, b0 + ks * 512, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(2, 5, 6);
          if (MT == 2) {
            _tile_loadd(7, b1 + ks * 512, 64);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
      }
      _tile_stored(0, cb, 64);
      _tile_stored(2, cb + 256, 64);
      amx_fwd_store(a, cb, n0, 0, rows, bt, np);
      amx_fwd_store(a, cb + 256, n0 + 16, 0, rows, bt, np);
      if (MT == 2) {
        _tile_stored(1, cb + 512, 64);
        _tile_stored(3, cb + 768, 64);
        amx_fwd_store(a, cb + 512, n0, 16, rows, bt, np);
        amx_fwd_store(a, cb + 768, n0 + 16, 16, rows, bt, np);
      }
    }
    _tile_release();
  });
}

inline void linear_amx(const Runtime& rt, const LinearArgs& a) {
  const int64_t K = a.w.K, N = a.w.N, Kp = round_up(K, 64), KS = Kp / 32;
  const int64_t rows = a.x[0].count + a.x[1].count, MT = ceil_div(rows, 16);
  Buffer xbuf(MT * KS * 1024);
  uint16_t* xv = xbuf.as<uint16_t>();
  pack_vnni_rows(rt, a.x, rows, K, KS, xv);
  // B^T [r, np] fp32, zero-padded to whole vectors: the epilogue's up-projection operand.
  const bool lora = a.z != nullptr && a.r > 0 && a.x[0].count > 0;
  const int64_t np = round_up(N, 16);
  Buffer btbuf(lora ? a.r * np * 4 : 0);
  float* bt = lora ? btbuf.as<float>() : nullptr;
  if (lora) {
    std::memset(bt, 0, a.r * np * 4);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < a.r; ++j) bt[j * np + n] = a.lora_B[n * a.r + j];
  }
  if (MT <= 2 && K % 64 == 0) return linear_amx_few(rt, a, xv, KS, MT, rows, bt, np);
  // Rows are processed in groups of kGroupTiles 16-row tiles whose activations (8 KiB per row at
  // K = 4096) stay in L2 while every 32-row block of W passes: W is dequantized once per group,
  // which at M = 512 costs less than streaming all activations from L3 for every block of W.
  // Within a block, K is walked in chunks of kKC so that the block's A tiles (32 KiB) are read
  // from L1 by every row pair of the group; partial sums wait in a small fp32 buffer.
  constexpr int64_t kGroupTiles = 8, kKC = 512;
  parallel(rt, 0, ceil_div(N, 32), 1, [&](int64_t bb, int64_t be) {
    amx_configure();
    // 32 rows of W dequantized row by row (sequential stores: 2.5x faster here than writing
    // tile-shaped blocks); an A tile is 16 of these rows at a 64-byte column offset.
    Buffer wbuf(32 * Kp * 2), cbuf(kGroupTiles * 2 * 1024);
    uint16_t* wa = wbuf.as<uint16_t>();
    float* cb = cbuf.as<float>();  // C tile (m-tile j, n-tile t) at (2 * j + t) * 256 floats
    const int64_t lda = Kp * 2;
    for (int64_t g0 = 0; g0 < MT; g0 += kGroupTiles) {
      const int64_t g1 = imin(MT, g0 + kGroupTiles);
      for (int64_t nb = bb; nb < be; ++nb) {
        const int64_t n0 = nb * 32;
        for (int i = 0; i < 32; ++i) {
          if (n0 + i < N) {
            dequant_bf16(a.w, n0 + i, 0, Kp, wa + i * Kp, 64, 32);
          } else {
            std::memset(wa + i * Kp, 0, Kp * 2);
          }
        }
        std::memset(cb, 0, (g1 - g0) * 2 * 1024);
        for (int64_t kc = 0; kc < KS; kc += kKC / 32) {
          const int64_t kce = imin(KS, kc + kKC / 32);
          const uint16_t* a0 = wa;
          const uint16_t* a1 = wa + 16 * Kp;
          int64_t mt = g0;
          for (; mt + 2 <= g1; mt += 2) {
            float* c = cb + (mt - g0) * 512;  // tiles (mt, 0), (mt, 1), (mt + 1, 0), (mt + 1, 1)
            const uint16_t* b0 = xv + mt * KS * 512;
            const uint16_t* b1 = b0 + KS * 512;
            _tile_loadd(0, c, 64);
            _tile_loadd(1, c + 512, 64);
            _tile_loadd(2, c + 256, 64);
            _tile_loadd(3, c + 768, 64);
            for (int64_t ks = kc; ks < kce; ++ks) {
              _tile_loadd(4, a0 + ks * 32, lda);
              _tile_loadd(5, a1 + ks * 32, lda);
              _tile_loadd(6, b0 + ks * 512, 64);
              _tile_loadd(7, b1 + ks * 512, 64);
              _tile_dpbf16ps(0, 4, 6);
              _tile_dpbf16ps(1, 4, 7);
              _tile_dpbf16ps(2, 5, 6);
              _tile_dpbf16ps(3, 5, 7);
            }
            _tile_stored(0, c, 64);
            _tile_stored(1, c + 512, 64);
            _tile_stored(2, c + 256, 64);
            _tile_stored(3, c + 768, 64);
          }
          if (mt < g1) {
            float* c = cb + (mt - g0) * 512;
            const uint16_t* b0 = xv + mt * KS * 512;
            _tile_loadd(0, c, 64);
            _tile_loadd(2, c + 256, 64);
            for (int64_t ks = kc; ks < kce; ++ks) {
              _tile_loadd(6, b0 + ks * 512, 64);
              _tile_loadd(4, a0 + ks * 32, lda);
              _tile_loadd(5, a1 + ks * 32, lda);
              _tile_dpbf16ps(0, 4, 6);
              _tile_dpbf16ps(2, 5, 6);
            }
            _tile_stored(0, c, 64);
            _tile_stored(2, c + 256, 64);
          }
        }
        for (int64_t mt = g0; mt < g1; ++mt) {
          const float* c = cb + (mt - g0) * 512;
          amx_fwd_store(a, c, n0, mt * 16, rows, bt, np);
          amx_fwd_store(a, c + 256, n0 + 16, mt * 16, rows, bt, np);
        }
      }
    }
    _tile_release();
  });
}

// ------------------------------------------------------------------------------------ dX
// Word pairs (W[n, k], W[n + 1, k]) for the 64 columns of a k-block, as 4 B-tile rows of 16 k.
inline void pair_rows(const uint16_t* split_n, const uint16_t* split_n1, uint16_t* out, int64_t tile_stride) {
  alignas(64) static const uint16_t kLo[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                              8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint32_t kLo32[16] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
  const __m512i lo16 = _mm512_load_si512(kLo);
  const __m512i hi16 = _mm512_add_epi16(lo16, _mm512_set1_epi16(16));
  const __m512i lo32 = _mm512_load_si512(kLo32);
  const __m512i hi32 = _mm512_add_epi32(lo32, _mm512_set1_epi32(8));
  const __m512i en = _mm512_loadu_si512(split_n), on = _mm512_loadu_si512(split_n + 32);
  const __m512i e1 = _mm512_loadu_si512(split_n1), o1 = _mm512_loadu_si512(split_n1 + 32);
  // (W[n, 2i], W[n+1, 2i]) and (W[n, 2i+1], W[n+1, 2i+1]) for i = 0..15 and 16..31
  const __m512i pe0 = _mm512_permutex2var_epi16(en, lo16, e1), pe1 = _mm512_permutex2var_epi16(en, hi16, e1);
  const __m512i po0 = _mm512_permutex2var_epi16(on, lo16, o1), po1 = _mm512_permutex2var_epi16(on, hi16, o1);
  // interleave even and odd k: natural k order, 16 pairs per tile row
  _mm512_storeu_si512(out, _mm512_permutex2var_epi32(pe0, lo32, po0));
  _mm512_storeu_si512(out + tile_stride, _mm512_permutex2var_epi32(pe0, hi32, po0));
  _mm512_storeu_si512(out + 2 * tile_stride, _mm512_permutex2var_epi32(pe1, lo32, po1));
  _mm512_storeu_si512(out + 3 * tile_stride, _mm512_permutex2var_epi32(pe1, hi32, po1));
}

// Epilogue of one dX tile (16 rows m x 16 columns k, fp32 at c): LoRA term, round, store.
inline void amx_dx_store(const DxArgs& a, const float* c, int64_t m0, int64_t k0, const float* a_pad, int64_t Kp,
                         int64_t ldc = 16) {
  const int64_t M = a.dy.count, K = a.w.K, valid = K - k0;
  if (valid <= 0) return;
  const __mmask16 lanes = lanes16(valid);
  uint16_t* dx = static_cast<uint16_t*>(a.dx);
  for (int i = 0; i < 16 && m0 + i < M; ++i) {
    const int64_t m = m0 + i;
    __m512 v = _mm512_loadu_ps(c + i * ldc);
    if (a.ds != nullptr && a.r > 0) {
      __m512 t = _mm512_setzero_ps();
      for (int64_t j = 0; j < a.r; ++j)
        t = _mm512_fmadd_ps(_mm512_set1_ps(a.ds[m * a.r + j]), _mm512_loadu_ps(a_pad + j * Kp + k0), t);
      if (a.mask.data != nullptr) {
        const __m512i b = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lanes, a.mask.data + m * a.mask.stride + k0));
        t = _mm512_mul_ps(t, _mm512_maskz_mov_ps(_mm512_test_epi32_mask(b, b), _mm512_set1_ps(a.keep_scale)));
      }
      v = _mm512_add_ps(v, t);
    }
    store_bf16(dx + m * K + k0, v, valid);
  }
}

inline void linear_dx_amx(const Runtime& rt, const DxArgs& a) {
  // Blocking: each thread owns kKB columns of dx; for each group of rows (kGroupTiles tiles, fp32
  // partial sums in a [rows, kKB] buffer) it walks W in chunks of kNC rows, dequantizing each
  // [kNC, kKB] slice of W once into B tiles (256 KiB, L2) and streaming dy's matching columns.
  // dy is read K / kKB times (32 MiB at 512 x 4096), W's bytes once per row group.
  constexpr int64_t kKB = 256, kNC = 512, kGroupTiles = 16;
  const int64_t M = a.dy.count, N = a.w.N, K = a.w.K, Kp = round_up(K, 64);
  const int64_t MT = ceil_div(M, 16), NS = ceil_div(N, 32);
  // dy as A tiles: tile (mt, ns) at (mt * NS + ns) * 512 words, 16 rows x 32 columns.
  Buffer dybuf(MT * NS * 1024);
  uint16_t* dyt = dybuf.as<uint16_t>();
  parallel(rt, 0, MT, 1, [&](int64_t tb, int64_t te) {
    for (int64_t mt = tb; mt < te; ++mt)
      for (int i = 0; i < 16; ++i) {
        const int64_t m = mt * 16 + i;
        const uint16_t* src = m < M ? reinterpret_cast<const uint16_t*>(row_ptr(a.dy, m, kBF16)) : nullptr;
        for (int64_t ns = 0; ns < NS; ++ns) {
          __m512i v = _mm512_setzero_si512();
          if (src != nullptr) {
            const int64_t valid = imin(32, N - ns * 32);
            const __mmask32 lanes = valid >= 32 ? ~__mmask32(0) : ((__mmask32(1) << valid) - 1);
            v = _mm512_maskz_loadu_epi16(lanes, src + ns * 32);
          }
          _mm512_storeu_si512(dyt + (mt * NS + ns) * 512 + i * 32, v);
        }
      }
  });
  const bool lora = a.ds != nullptr && a.r > 0;
  Buffer abuf(lora ? a.r * Kp * 4 : 0);
  if (lora) pad_rows(a.lora_A, a.r, K, Kp, abuf.as<float>());
  parallel(rt, 0, ceil_div(Kp, kKB), 1, [&](int64_t bb, int64_t be) {
    amx_configure();
    Buffer wbuf((kNC / 32) * (kKB / 16) * 1024), accbuf(kGroupTiles * 16 * kKB * 4), rowbuf(2 * kKB * 2),
        zero(kKB * 2);
    uint16_t* wb = wbuf.as<uint16_t>();
    float* acc = accbuf.as<float>();
    uint16_t* rn = rowbuf.as<uint16_t>();
    uint16_t* z = zero.as<uint16_t>();
    std::memset(z, 0, kKB * 2);
    for (int64_t blk = bb; blk < be; ++blk) {
      const int64_t k0 = blk * kKB, kw = imin(kKB, Kp - k0), KT = kw / 16;  // kw: a multiple of 64
      const int64_t ldc = kw * 4;
      for (int64_t g0 = 0; g0 < MT; g0 += kGroupTiles) {
        const int64_t g1 = imin(MT, g0 + kGroupTiles);
        std::memset(acc, 0, (g1 - g0) * 16 * kw * 4);
        for (int64_t n0 = 0; n0 < N; n0 += kNC) {
          const int64_t steps = ceil_div(imin(kNC, N - n0), 32);
          // B tiles of this slice: tile (ns, kt) at (ns * KT + kt) * 512 words.
          for (int64_t ns = 0; ns < steps; ++ns)
            for (int nn = 0; nn < 16; ++nn) {
              const int64_t n = n0 + ns * 32 + 2 * nn;
              const uint16_t* r0 = z;
              const uint16_t* r1 = z;
              if (n < N) {
                dequant_bf16(a.w, n, k0, kw, rn, 64, 32);
                r0 = rn;
              }
              if (n + 1 < N) {
                dequant_bf16(a.w, n + 1, k0, kw, rn + kKB, 64, 32);
                r1 = rn + kKB;
              }
              for (int64_t c = 0; c * 64 < kw; ++c)
                pair_rows(r0 + 64 * c, r1 + 64 * c, wb + (ns * KT + 4 * c) * 512 + nn * 32, 512);
            }
          const int64_t ns0 = n0 / 32;
          int64_t mt = g0;
          for (; mt + 2 <= g1; mt += 2) {
            float* c0 = acc + (mt - g0) * 16 * kw;
            float* c1 = c0 + 16 * kw;
            for (int64_t kt = 0; kt < KT; kt += 2) {
              _tile_loadd(0, c0 + kt * 16, ldc);
              _tile_loadd(1, c0 + kt * 16 + 16, ldc);
              _tile_loadd(2, c1 + kt * 16, ldc);
              _tile_loadd(3, c1 + kt * 16 + 16, ldc);
              for (int64_t ns = 0; ns < steps; ++ns) {
                _tile_loadd(4, dyt + (mt * NS + ns0 + ns) * 512, 64);
                _tile_loadd(5, dyt + ((mt + 1) * NS + ns0 + ns) * 512, 64);
                _tile_loadd(6, wb + (ns * KT + kt) * 512, 64);
                _tile_loadd(7, wb + (ns * KT + kt + 1) * 512, 64);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
              }
              _tile_stored(0, c0 + kt * 16, ldc);
              _tile_stored(1, c0 + kt * 16 + 16, ldc);
              _tile_stored(2, c1 + kt * 16, ldc);
              _tile_stored(3, c1 + kt * 16 + 16, ldc);
            }
          }
          if (mt < g1) {
            float* c0 = acc + (mt - g0) * 16 * kw;
            for (int64_t kt = 0; kt < KT; kt += 2) {
              _tile_loadd(0, c0 + kt * 16, ldc);
              _tile_loadd(1, c0 + kt * 16 + 16, ldc);
              for (int64_t ns = 0; ns < steps; ++ns) {
                _tile_loadd(4, dyt + (mt * NS + ns0 + ns) * 512, 64);
                _tile_loadd(6, wb + (ns * KT + kt) * 512, 64);
                _tile_loadd(7, wb + (ns * KT + kt + 1) * 512, 64);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
              }
              _tile_stored(0, c0 + kt * 16, ldc);
              _tile_stored(1, c0 + kt * 16 + 16, ldc);
            }
          }
        }
        for (int64_t mt = g0; mt < g1; ++mt)
          for (int64_t kt = 0; kt < KT; ++kt)
            amx_dx_store(a, acc + (mt - g0) * 16 * kw + kt * 16, mt * 16, k0 + kt * 16, abuf.as<float>(), Kp, kw);
      }
    }
    _tile_release();
  });
}
