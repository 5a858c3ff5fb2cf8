// The fp32-FMA kernel family, one template over a vector type V (simd_*.h). Every dtype runs
// here: dequantized weights are rounded to the activation dtype first (as bitsandbytes rounds
// them), activations are widened to fp32, so each product of two 16-bit values is exact in fp32
// and only the fp32 accumulation rounds. Include inside an anonymous namespace after common.h.
//
// Forward ("row-dot"): for a tile of NR rows of W, dequantize the rows once into a small buffer
// (NR * K fp32: 64 KiB for K = 4096), then run every MR-row tile of activations over it with
// lanes along K and MR x NR accumulators in registers, summing the lanes at the end. The LoRA
// up-projection rides in the same accumulators (z and B padded to whole vectors), so the output
// is rounded once. Source rows (FLARE's second stream) share each dequantized tile.

// W[n, k0 .. k0 + len) (len a multiple of 2W) in split order per chunk, rounded to dt; zeros past K.
template <class V>
void dequant_split(const NF4& w, int64_t n, int64_t k0, int64_t len, DType dt, float* out) {
  constexpr int C = 2 * V::W;
  const int64_t K = w.K;
  const int64_t row = n * K;
  int64_t lut_block = -1;
  typename V::Lut lut{};
  for (int64_t c0 = 0; c0 < len; c0 += C) {
    const int64_t k = k0 + c0;
    const int64_t f0 = row + k;
    if (k + C <= K && (f0 & 1) == 0 && (f0 >> w.log2_bs) == ((f0 + C - 1) >> w.log2_bs)) {
      const int64_t b = f0 >> w.log2_bs;
      if (b != lut_block) {
        lut = V::make_lut(w.code, block_scale(w, b), dt);
        lut_block = b;
      }
      V::dequant_chunk(w.packed + (f0 >> 1), lut, out + c0);
    } else {  // chunk across a block boundary, an odd row start, or past K: element by element
      for (int e = 0; e < C; ++e) out[c0 + split_pos(e, C)] = k + e < K ? element(w, n, k + e, dt) : 0.0f;
    }
  }
}

template <class V>
void dequantize_f(const Runtime& rt, const NF4& w, DType dt, void* out) {
  constexpr int C = 2 * V::W;
  const int64_t K = w.K, Kp = round_up(K, C);
  parallel(rt, 0, w.N, 16, [&](int64_t nb, int64_t ne) {
    Buffer tmp(Kp * 4);
    float* t = tmp.as<float>();
    for (int64_t n = nb; n < ne; ++n) {
      dequant_split<V>(w, n, 0, Kp, dt, t);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t c0 = k / C * C;
        store_scalar(out, n * K + k, t[c0 + split_pos(k - c0, C)], dt);  // exact: t is already rounded
      }
    }
  });
}

// Activation rows as fp32 in split order, zero-padded to Kp.
template <class V>
void pack_split_f32(const Runtime& rt, const Rows* streams, int nstreams, DType dt, int64_t K, int64_t Kp,
                    float* out) {
  constexpr int C = 2 * V::W;
  int64_t rows = 0;
  for (int s = 0; s < nstreams; ++s) rows += streams[s].count;
  parallel(rt, 0, rows, 8, [&](int64_t rb, int64_t re) {
    for (int64_t i = rb; i < re; ++i) {
      const char* src = stream_row(streams, i, dt);
      float* dst = out + i * Kp;
      for (int64_t k0 = 0; k0 < Kp; k0 += C)
        for (int e = 0; e < C; ++e) dst[k0 + split_pos(e, C)] = k0 + e < K ? load_scalar(src, k0 + e, dt) : 0.0f;
    }
  });
}

// LoRA operands padded to whole vectors: zs = scaling * z [rows, RW], Bp = B [N, RW].
struct LoraPad {
  const float* zs = nullptr;
  const float* bp = nullptr;
  int64_t rw = 0;
};

inline void pad_lora(const LinearArgs& a, int64_t rw, float* zs, float* bp) {
  const int64_t rows = a.x[0].count, N = a.w.N;
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t j = 0; j < rw; ++j) zs[m * rw + j] = j < a.r ? a.scaling * a.z[m * a.r + j] : 0.0f;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < rw; ++j) bp[n * rw + j] = j < a.r ? a.lora_B[n * a.r + j] : 0.0f;
}

// Writes y for rows m0 .. m0 + MRt and W rows n0 .. n0 + nr from lane accumulators.
template <class V, int MRt, int NRt = V::NR>
inline void finish_rows(typename V::F (&acc)[MRt][NRt], const LinearArgs& a, const LoraPad& lp, int64_t m0,
                        int64_t n0, int64_t nr) {
  const int64_t N = a.w.N, lora_rows = a.x[0].count;
  for (int m = 0; m < MRt; ++m) {
    const int64_t row = m0 + m;
    const int s = row < lora_rows ? 0 : 1;
    const int64_t out_row = s ? row - lora_rows : row;
    for (int i = 0; i < nr; ++i) {
      const int64_t n = n0 + i;
      typename V::F t = acc[m][i];
      if (s == 0 && lp.zs != nullptr)
        for (int64_t q = 0; q < lp.rw; q += V::W) t = V::fma(V::load(lp.zs + row * lp.rw + q), V::load(lp.bp + n * lp.rw + q), t);
      float v = V::hsum(t);
      if (a.bias != nullptr) v += a.bias[n];
      store_scalar(a.y[s], out_row * N + n, v, a.dtype);
    }
  }
}

template <class V, int MRt>
void rowdot_tile(const float* xp, int64_t Kp, const float* wb, const LinearArgs& a, const LoraPad& lp, int64_t m0,
                 int64_t n0, int64_t nr) {
  using F = typename V::F;
  constexpr int NR = V::NR;
  F acc[MRt][NR];
  for (int m = 0; m < MRt; ++m)
    for (int i = 0; i < NR; ++i) acc[m][i] = V::zero();
  const float* x0 = xp + m0 * Kp;
  for (int64_t k = 0; k < Kp; k += V::W) {
    F wv[NR];
    for (int i = 0; i < NR; ++i) wv[i] = V::load(wb + i * Kp + k);
    for (int m = 0; m < MRt; ++m) {
      const F xv = V::load(x0 + m * Kp + k);
      for (int i = 0; i < NR; ++i) acc[m][i] = V::fma(xv, wv[i], acc[m][i]);
    }
  }
  finish_rows<V, MRt>(acc, a, lp, m0, n0, nr);
}

template <class V, int MRt>
void rowdot_rows(const float* xp, int64_t Kp, const float* wb, const LinearArgs& a, const LoraPad& lp, int64_t rows,
                 int64_t n0, int64_t nr) {
  int64_t m0 = 0;
  for (; m0 + MRt <= rows; m0 += MRt) rowdot_tile<V, MRt>(xp, Kp, wb, a, lp, m0, n0, nr);
  for (; m0 < rows; ++m0) rowdot_tile<V, 1>(xp, Kp, wb, a, lp, m0, n0, nr);
}

template <class V>
void linear_f(const Runtime& rt, const LinearArgs& a) {
  constexpr int C = 2 * V::W, NR = V::NR;
  const int64_t K = a.w.K, N = a.w.N, Kp = round_up(K, C);
  const int64_t rows = a.x[0].count + a.x[1].count;
  Buffer xbuf(rows * Kp * 4);
  float* xp = xbuf.as<float>();
  pack_split_f32<V>(rt, a.x, 2, a.dtype, K, Kp, xp);
  LoraPad lp;
  const bool lora = a.z != nullptr && a.r > 0 && a.x[0].count > 0;
  lp.rw = round_up(a.r, V::W);
  Buffer zbuf(lora ? a.x[0].count * lp.rw * 4 : 0), bbuf(lora ? N * lp.rw * 4 : 0);
  if (lora) {
    pad_lora(a, lp.rw, zbuf.as<float>(), bbuf.as<float>());
    lp.zs = zbuf.as<float>();
    lp.bp = bbuf.as<float>();
  }
  parallel_claim(rt, ceil_div(N, NR), [&](Claims& claims) {
    Buffer wbuf(NR * Kp * 4);
    float* wb = wbuf.as<float>();
    for (int64_t tb, te; claims.next(tb, te);) {
      for (int64_t t = tb; t < te; ++t) {
        const int64_t n0 = t * NR, nr = imin(NR, N - n0);
        for (int i = 0; i < NR; ++i) {
          if (i < nr) {
            dequant_split<V>(a.w, n0 + i, 0, Kp, a.dtype, wb + i * Kp);
          } else {
            std::memset(wb + i * Kp, 0, Kp * 4);
          }
        }
        rowdot_rows<V, V::MR>(xp, Kp, wb, a, lp, rows, n0, nr);
      }
    }
  });
}

// ------------------------------------------------------------------------------------- dX
// dx = dy W (+ the LoRA term): lanes along K, so each thread owns a block of KB = 4W columns of dx
// and walks all rows of W. The block of W (NC rows x KB columns, 64 KiB at AVX-512) is dequantized
// once and reused by every MR_DX-row tile of dy; partial sums live in a [M, KB] buffer across
// row chunks of W, so any N fits in cache.
template <class V>
struct DxShape {
  static constexpr int VB = 4;              // vectors per k-block
  static constexpr int KB = VB * V::W;      // columns per k-block (2 chunks)
  static constexpr int MR = V::W == 16 ? 5 : (V::W == 8 ? 2 : 4);
  static constexpr int NC = 256;            // rows of W per dequantized block
};

template <class V, int MRt>
void dx_tile(float* acc_rows, const float* dy, int64_t dy_stride, const float* wb, int64_t nrows) {
  using F = typename V::F;
  constexpr int VB = DxShape<V>::VB, KB = DxShape<V>::KB;
  F acc[MRt][VB];
  for (int m = 0; m < MRt; ++m)
    for (int v = 0; v < VB; ++v) acc[m][v] = V::load(acc_rows + m * KB + v * V::W);
  for (int64_t j = 0; j < nrows; ++j) {
    F wv[VB];
    for (int v = 0; v < VB; ++v) wv[v] = V::load(wb + j * KB + v * V::W);
    for (int m = 0; m < MRt; ++m) {
      const F b = V::set1(dy[m * dy_stride + j]);
      for (int v = 0; v < VB; ++v) acc[m][v] = V::fma(b, wv[v], acc[m][v]);
    }
  }
  for (int m = 0; m < MRt; ++m)
    for (int v = 0; v < VB; ++v) V::store(acc_rows + m * KB + v * V::W, acc[m][v]);
}

// Adds the LoRA term to one row of dx (natural order, fp32, `len` columns from k0) and stores it.
template <class V>
void dx_finish_row(const DxArgs& a, int64_t m, int64_t k0, int64_t len, const float* a_pad, int64_t Kp, float* row) {
  const int64_t K = a.w.K;
  if (a.ds != nullptr && a.r > 0) {
    const float* ds = a.ds + m * a.r;
    const uint8_t* mrow = a.mask.data ? a.mask.data + m * a.mask.stride : nullptr;
    int64_t e = 0;
    for (; e + V::W <= len && k0 + e + V::W <= K; e += V::W) {
      typename V::F t = V::zero();
      for (int64_t j = 0; j < a.r; ++j) t = V::fma(V::set1(ds[j]), V::load(a_pad + j * Kp + k0 + e), t);
      if (mrow) t = V::mul(t, V::load_keep(mrow + k0 + e, a.keep_scale));
      V::store(row + e, V::add(V::load(row + e), t));
    }
    for (; e < len && k0 + e < K; ++e) {
      float t = 0.0f;
      for (int64_t j = 0; j < a.r; ++j) t += ds[j] * a_pad[j * Kp + k0 + e];
      if (mrow) t *= mrow[k0 + e] ? a.keep_scale : 0.0f;
      row[e] += t;
    }
  }
  for (int64_t e = 0; e < len && k0 + e < K; ++e) store_scalar(a.dx, m * K + k0 + e, row[e], a.dtype);
}

// A [r, K] padded to [r, Kp] with zeros (so vector loads past K read zeros).
inline void pad_rows(const float* src, int64_t rows, int64_t cols, int64_t cols_p, float* dst) {
  for (int64_t j = 0; j < rows; ++j) {
    std::memcpy(dst + j * cols_p, src + j * cols, cols * 4);
    std::memset(dst + j * cols_p + cols, 0, (cols_p - cols) * 4);
  }
}

template <class V>
void linear_dx_f(const Runtime& rt, const DxArgs& a) {
  using S = DxShape<V>;
  constexpr int C = 2 * V::W, KB = S::KB;
  const int64_t M = a.dy.count, N = a.w.N, K = a.w.K, Kp = round_up(K, KB);
  Buffer dybuf(M * N * 4);
  float* dyp = dybuf.as<float>();
  parallel(rt, 0, M, 8, [&](int64_t mb, int64_t me) {
    for (int64_t m = mb; m < me; ++m) {
      const char* src = row_ptr(a.dy, m, a.dtype);
      for (int64_t n = 0; n < N; ++n) dyp[m * N + n] = load_scalar(src, n, a.dtype);
    }
  });
  const bool lora = a.ds != nullptr && a.r > 0;
  Buffer abuf(lora ? a.r * Kp * 4 : 0);
  if (lora) pad_rows(a.lora_A, a.r, K, Kp, abuf.as<float>());
  parallel(rt, 0, Kp / KB, 1, [&](int64_t bb, int64_t be) {
    Buffer wbuf(S::NC * KB * 4), accbuf(M * KB * 4), rowbuf(KB * 4);
    float* wb = wbuf.as<float>();
    float* acc = accbuf.as<float>();
    float* row = rowbuf.as<float>();
    for (int64_t blk = bb; blk < be; ++blk) {
      const int64_t k0 = blk * KB;
      std::memset(acc, 0, M * KB * 4);
      for (int64_t n0 = 0; n0 < N; n0 += S::NC) {
        const int64_t nc = imin(S::NC, N - n0);
        for (int64_t j = 0; j < nc; ++j) dequant_split<V>(a.w, n0 + j, k0, KB, a.dtype, wb + j * KB);
        int64_t m0 = 0;
        for (; m0 + S::MR <= M; m0 += S::MR) dx_tile<V, S::MR>(acc + m0 * KB, dyp + m0 * N + n0, N, wb, nc);
        for (; m0 < M; ++m0) dx_tile<V, 1>(acc + m0 * KB, dyp + m0 * N + n0, N, wb, nc);
      }
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t e = 0; e < KB; ++e) row[e] = acc[m * KB + e / C * C + split_pos(e % C, C)];
        dx_finish_row<V>(a, m, k0, KB, abuf.as<float>(), Kp, row);
      }
    }
  });
}

// ------------------------------------------------------------------------------- rank-r GEMMs
// out[m, j] = out_scale * sum_c keep(m, c) x[m, c] v[j, c]: rows in parallel, 8 outputs at a time.
template <class V, int JN>
void down_row(const DownArgs& a, const char* xr, const uint8_t* mrow, int64_t j0, float* out) {
  using F = typename V::F;
  F acc[JN];
  for (int j = 0; j < JN; ++j) acc[j] = V::zero();
  const int64_t C = a.cols;
  int64_t c = 0;
  for (; c + V::W <= C; c += V::W) {
    F xv = V::load_act(xr, c, a.dtype);
    if (mrow) xv = V::mul(xv, V::load_keep(mrow + c, a.keep_scale));
    for (int j = 0; j < JN; ++j) acc[j] = V::fma(xv, V::load(a.v + (j0 + j) * C + c), acc[j]);
  }
  float tail[JN];
  for (int j = 0; j < JN; ++j) tail[j] = 0.0f;
  for (; c < C; ++c) {
    float xv = load_scalar(xr, c, a.dtype);
    if (mrow) xv *= mrow[c] ? a.keep_scale : 0.0f;
    for (int j = 0; j < JN; ++j) tail[j] += xv * a.v[(j0 + j) * C + c];
  }
  for (int j = 0; j < JN; ++j) out[j0 + j] = a.out_scale * (V::hsum(acc[j]) + tail[j]);
}

template <class V>
void rank_down_f(const Runtime& rt, const DownArgs& a) {
  parallel(rt, 0, a.x.count, 4, [&](int64_t mb, int64_t me) {
    for (int64_t m = mb; m < me; ++m) {
      const char* xr = row_ptr(a.x, m, a.dtype);
      const uint8_t* mrow = a.mask.data ? a.mask.data + m * a.mask.stride : nullptr;
      int64_t j0 = 0;
      for (; j0 + 8 <= a.r; j0 += 8) down_row<V, 8>(a, xr, mrow, j0, a.out + m * a.r);
      for (; j0 < a.r; ++j0) down_row<V, 1>(a, xr, mrow, j0, a.out + m * a.r);
    }
  });
}

// out[j, c] = sum_s sum_m l_s[m, j] keep_s(m, c) x_s[m, c]: columns in parallel (no atomics, a
// fixed summation order), 2W columns x JN outputs in registers.
template <class V, int JN>
void reduce_block(const ReduceArgs& a, int64_t c0, int64_t j0) {
  using F = typename V::F;
  F acc[JN][2];
  for (int j = 0; j < JN; ++j) acc[j][0] = acc[j][1] = V::zero();
  for (int s = 0; s < a.streams; ++s) {
    const float* l = a.l[s];
    for (int64_t m = 0; m < a.x[s].count; ++m) {
      const char* xr = row_ptr(a.x[s], m, a.dtype);
      F x0 = V::load_act(xr, c0, a.dtype), x1 = V::load_act(xr, c0 + V::W, a.dtype);
      if (a.mask[s].data) {
        const uint8_t* mrow = a.mask[s].data + m * a.mask[s].stride + c0;
        x0 = V::mul(x0, V::load_keep(mrow, a.keep_scale));
        x1 = V::mul(x1, V::load_keep(mrow + V::W, a.keep_scale));
      }
      for (int j = 0; j < JN; ++j) {
        const F b = V::set1(l[m * a.r + j0 + j]);
        acc[j][0] = V::fma(b, x0, acc[j][0]);
        acc[j][1] = V::fma(b, x1, acc[j][1]);
      }
    }
  }
  for (int j = 0; j < JN; ++j) {
    V::store(a.out + (j0 + j) * a.cols + c0, acc[j][0]);
    V::store(a.out + (j0 + j) * a.cols + c0 + V::W, acc[j][1]);
  }
}

inline void reduce_tail(const ReduceArgs& a, int64_t c0) {
  for (int64_t j = 0; j < a.r; ++j)
    for (int64_t c = c0; c < a.cols; ++c) {
      float t = 0.0f;
      for (int s = 0; s < a.streams; ++s)
        for (int64_t m = 0; m < a.x[s].count; ++m) {
          float xv = load_scalar(row_ptr(a.x[s], m, a.dtype), c, a.dtype);
          if (a.mask[s].data) xv *= a.mask[s].data[m * a.mask[s].stride + c] ? a.keep_scale : 0.0f;
          t += a.l[s][m * a.r + j] * xv;
        }
      a.out[j * a.cols + c] = t;
    }
}

template <class V>
void rank_reduce_f(const Runtime& rt, const ReduceArgs& a) {
  constexpr int CB = 2 * V::W;
  const int64_t full = a.cols / CB;
  parallel(rt, 0, full + 1, 1, [&](int64_t bb, int64_t be) {
    for (int64_t blk = bb; blk < be; ++blk) {
      if (blk == full) {
        reduce_tail(a, full * CB);
        continue;
      }
      int64_t j0 = 0;
      for (; j0 + 8 <= a.r; j0 += 8) reduce_block<V, 8>(a, blk * CB, j0);
      for (; j0 < a.r; ++j0) reduce_block<V, 1>(a, blk * CB, j0);
    }
  });
}
