/* Fused CPU inference kernels of the Mamba layer, beside mail_ros/model/selective_scan.py and
 * Mamba._causal_conv (the references): the selective scan, the causal depthwise convolution,
 * and (at the end of this file) a whole stack of pre-norm Mamba blocks in one call, the
 * reference being mail_ros/model/mamba_stack.py over the PyTorch scan.
 *
 * One pass over the sequence computes, per batch element b, channel e and state index n,
 *
 *     delta_t = softplus(W_dt dt_t + dt_bias)               (W_dt optional; or delta as given)
 *     h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
 *     y_t     = (C_t . h_t + D * u_t) * silu(z_t)           (gate optional)
 *
 * keeping the state h of a block of channels in registers/L1 for the whole sequence, where the
 * PyTorch reference writes every h_t of every token out to memory and reads it back several
 * times. The reference stays the definition (and the training path); the tests hold the two
 * together.
 *
 * Layout: the state of a block of BLOCK channels is kept transposed, [n][e], so the inner loops
 * run over channels: they vectorise for any d_state (8, 16, ...), and the per-channel terms
 * (softplus, D skip, gate) vectorise with them. exp, exp2 and log below are branch-free
 * polynomial versions (Cephes' expf/logf, a Taylor 2^x; 1-2 ulp) so that the compiler can
 * vectorise the loops; libm's are scalar calls. Work is split over (batch, channel block) with OpenMP; the library is linked
 * against the libgomp already loaded by torch, so both share one thread pool.
 *
 * Plain C (no torch or Python headers): it compiles in about a second with the C compiler the
 * set-up requires, and is called through ctypes (mail_ros/model/cpu_kernel.py). float32 only.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

#define BLOCK 32
#define CONV_TILE 64 /* time steps per tile of the causal conv's input window */

/* Denormal states (a channel whose input stays near zero decays below 1e-38 over a long
 * prefill) cost about 4x per operation on x86; the kernels flush them to zero instead (the
 * difference is below 1e-38). The flag is per thread, so each task sets and restores it. */
#if defined(__x86_64__) || defined(__i386__)
typedef unsigned int fp_mode_t;
static inline fp_mode_t flush_denormals(void) {
    fp_mode_t mode = _mm_getcsr();
    _mm_setcsr(mode | 0x8040); /* FTZ | DAZ */
    return mode;
}
static inline void restore_fp_mode(fp_mode_t mode) { _mm_setcsr(mode); }
#elif defined(__aarch64__)
typedef uint64_t fp_mode_t;
static inline fp_mode_t flush_denormals(void) {
    fp_mode_t mode;
    __asm__ volatile("mrs %0, fpcr" : "=r"(mode));
    __asm__ volatile("msr fpcr, %0" : : "r"(mode | (1ull << 24))); /* FZ */
    return mode;
}
static inline void restore_fp_mode(fp_mode_t mode) { __asm__ volatile("msr fpcr, %0" : : "r"(mode)); }
#else
typedef int fp_mode_t;
static inline fp_mode_t flush_denormals(void) { return 0; }
static inline void restore_fp_mode(fp_mode_t mode) { (void)mode; }
#endif

static inline float bits_to_float(int32_t i) { float f; memcpy(&f, &i, sizeof f); return f; }
static inline int32_t float_to_bits(float f) { int32_t i; memcpy(&i, &f, sizeof i); return i; }

/* exp(x): x = k ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-7 polynomial, 2^k by the exponent
 * bits. Inputs below -87.3 give about 1e-38 instead of a denormal or 0 (harmless here: the
 * decays multiply states, the results stay far below float32 rounding of the other terms). */
static inline float exp_ps(float x) {
    x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
    /* Round x / ln2 to nearest by the 1.5 * 2^23 trick (no call, vectorises). */
    float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - k * 0.693359375f + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * bits_to_float(((int32_t)k + 127) << 23);
}

/* log(x) for normal x > 0: x = m 2^k with m in [sqrt(1/2), sqrt(2)), log(m) by a polynomial. */
static inline float log_ps(float x) {
    int32_t bits = float_to_bits(x);
    float k = (float)(((bits >> 23) & 0xff) - 126);
    float m = bits_to_float((bits & 0x007fffff) | 0x3f000000); /* in [0.5, 1) */
    int small = m < 0.707106781186547524f;
    k = small ? k - 1.0f : k;
    m = small ? m + m - 1.0f : m - 1.0f;
    float z = m * m;
    float p = 7.0376836292e-2f;
    p = p * m - 1.1514610310e-1f;
    p = p * m + 1.1676998740e-1f;
    p = p * m - 1.2420140846e-1f;
    p = p * m + 1.4249322787e-1f;
    p = p * m - 1.6668057665e-1f;
    p = p * m + 2.0000714765e-1f;
    p = p * m - 2.4999993993e-1f;
    p = p * m + 3.3333331174e-1f;
    float y = p * m * z - 2.12194440e-4f * k - 0.5f * z;
    return m + y + 0.693359375f * k;
}

/* softplus as torch.nn.functional.softplus (threshold 20): log1p(exp(x)), with the usual
 * correction term so that it keeps its relative precision for very negative x. */
static inline float softplus_ps(float x) {
    float e = exp_ps(x < 20.0f ? x : 20.0f);
    float w = 1.0f + e;
    float l = log_ps(w) - ((w - 1.0f) - e) / w;
    l = w == 1.0f ? e : l;
    return x > 20.0f ? x : l;
}

/* 2^x for x <= 0 (below -126 it gives 2^-126): the scan's decays, exp(delta A) = 2^(delta A
 * log2(e)) with A pre-scaled. Rounding x to an integer k leaves f in [-1/2, 1/2], where the
 * degree-6 Taylor polynomial of 2^f is within 1.2e-7 (1 ulp); fewer operations than exp_ps,
 * which needs a two-constant reduction by ln 2, and the decays are most of the scan's work. */
static inline float exp2_ps(float x) {
    x = x < -126.0f ? -126.0f : x;
    float k = (x + 12582912.0f) - 12582912.0f;
    float f = x - k;
    float p = 1.5403530393e-4f;
    p = p * f + 1.3333558146e-3f;
    p = p * f + 9.6181291076e-3f;
    p = p * f + 5.5504108665e-2f;
    p = p * f + 2.4022650696e-1f;
    p = p * f + 6.9314718056e-1f;
    p = p * f + 1.0f;
    return p * bits_to_float(((int32_t)k + 127) << 23);
}

static inline float silu_ps(float x) { return x / (1.0f + exp_ps(-x)); }

/* Strides are in elements; the channel (u, dt, z, y) and state (B, C) dimensions are
 * contiguous. h (B, E, N) contiguous holds the initial state and receives the final one.
 * With dt_weight (E, R), dt rows hold R low-rank values projected to the E channels here (the
 * layer's dt_proj); without, dt rows hold E values. With a_is_log, A holds log(-A) (the layer's
 * A_log) and A = -exp(A_log) is formed here. Both spare the caller a tensor op per call. */
static void selective_scan_f32(
    int64_t batch, int64_t length, int64_t channels, int64_t d_state,
    const float *u, int64_t u_sb, int64_t u_sl,
    const float *dt, int64_t dt_sb, int64_t dt_sl,
    const float *dt_bias, int64_t dt_softplus,
    const float *A,
    const float *Bm, int64_t b_sb, int64_t b_sl,
    const float *Cm, int64_t c_sb, int64_t c_sl,
    const float *D,
    const float *z, int64_t z_sb, int64_t z_sl,
    float *h,
    float *y, int64_t y_sb, int64_t y_sl,
    int64_t num_threads, const float *dt_weight, int64_t dt_rank, int64_t a_is_log)
{
    const int64_t blocks = (channels + BLOCK - 1) / BLOCK;
    const int64_t tasks = batch * blocks;
    const int64_t rank = dt_weight != NULL ? dt_rank : 1;
    /* Fork only when there is enough work to pay for waking the other threads. */
    const int parallel = num_threads > 1 && tasks > 1 && batch * length * channels * d_state >= 16384;

#pragma omp parallel for schedule(static) num_threads(num_threads) if (parallel)
    for (int64_t task = 0; task < tasks; ++task) {
        const int64_t b = task / blocks;
        const int64_t e0 = (task % blocks) * BLOCK;
        const int64_t width = channels - e0 < BLOCK ? channels - e0 : BLOCK;
        const fp_mode_t fp_mode = flush_denormals();
        float state[d_state][BLOCK], At[d_state][BLOCK], Wt[rank][BLOCK];
        float delta[BLOCK], drive[BLOCK], acc[BLOCK], bias[BLOCK], skip[BLOCK];
        /* Transposed in (and out, below): a full block as vector gathers, a partial one lane by
         * lane, its padding lanes computing on zeros that are never stored. */
        const float *hb = h + (b * channels + e0) * d_state, *Ab = A + e0 * d_state;
        for (int64_t n = 0; n < d_state; ++n) {
            if (width == BLOCK) {
#pragma omp simd
                for (int64_t e = 0; e < BLOCK; ++e) {
                    state[n][e] = hb[e * d_state + n];
                    At[n][e] = Ab[e * d_state + n];
                }
            } else {
                for (int64_t e = 0; e < BLOCK; ++e) {
                    state[n][e] = e < width ? hb[e * d_state + n] : 0.0f;
                    At[n][e] = e < width ? Ab[e * d_state + n] : 0.0f;
                }
            }
        }
        if (a_is_log) {
            for (int64_t n = 0; n < d_state; ++n)
#pragma omp simd
                for (int64_t e = 0; e < BLOCK; ++e) At[n][e] = -exp_ps(At[n][e]);
        }
        /* A in log2 units: the decay is exp2_ps(delta * At). */
        for (int64_t n = 0; n < d_state; ++n)
#pragma omp simd
            for (int64_t e = 0; e < BLOCK; ++e) At[n][e] *= 1.44269504088896341f;
        for (int64_t e = 0; e < BLOCK; ++e)
            for (int64_t r = 0; r < rank; ++r)
                Wt[r][e] = dt_weight != NULL && e < width ? dt_weight[(e0 + e) * dt_rank + r] : 0.0f;
        for (int64_t e = 0; e < BLOCK; ++e) {
            bias[e] = dt_bias != NULL && e < width ? dt_bias[e0 + e] : 0.0f;
            skip[e] = D != NULL && e < width ? D[e0 + e] : 0.0f;
        }
        for (int64_t t = 0; t < length; ++t) {
            const float *ut = u + b * u_sb + t * u_sl + e0;
            const float *dtt = dt + b * dt_sb + t * dt_sl + (dt_weight != NULL ? 0 : e0);
            const float *Bt = Bm + b * b_sb + t * b_sl;
            const float *Ct = Cm + b * c_sb + t * c_sl;
            float uv[BLOCK];
            for (int64_t e = 0; e < BLOCK; ++e) uv[e] = e < width ? ut[e] : 0.0f;
            if (dt_weight != NULL) {
#pragma omp simd
                for (int64_t e = 0; e < BLOCK; ++e) delta[e] = bias[e];
                for (int64_t r = 0; r < rank; ++r) {
                    const float dr = dtt[r];
#pragma omp simd
                    for (int64_t e = 0; e < BLOCK; ++e) delta[e] += Wt[r][e] * dr;
                }
            } else {
                for (int64_t e = 0; e < BLOCK; ++e) delta[e] = (e < width ? dtt[e] : 0.0f) + bias[e];
            }
            if (dt_softplus) {
#pragma omp simd
                for (int64_t e = 0; e < BLOCK; ++e) delta[e] = softplus_ps(delta[e]);
            }
#pragma omp simd
            for (int64_t e = 0; e < BLOCK; ++e) {
                drive[e] = delta[e] * uv[e];
                acc[e] = 0.0f;
            }
            for (int64_t n = 0; n < d_state; ++n) {
                const float bn = Bt[n], cn = Ct[n];
#pragma omp simd
                for (int64_t e = 0; e < BLOCK; ++e) {
                    float s = exp2_ps(delta[e] * At[n][e]) * state[n][e] + drive[e] * bn;
                    state[n][e] = s;
                    acc[e] += s * cn;
                }
            }
            float *yt = y + b * y_sb + t * y_sl + e0;
            if (z != NULL) {
                const float *zt = z + b * z_sb + t * z_sl + e0;
                float zv[BLOCK];
                for (int64_t e = 0; e < BLOCK; ++e) zv[e] = e < width ? zt[e] : 0.0f;
#pragma omp simd
                for (int64_t e = 0; e < BLOCK; ++e) acc[e] = (acc[e] + skip[e] * uv[e]) * silu_ps(zv[e]);
            } else {
#pragma omp simd
                for (int64_t e = 0; e < BLOCK; ++e) acc[e] = acc[e] + skip[e] * uv[e];
            }
            for (int64_t e = 0; e < width; ++e) yt[e] = acc[e];
        }
        for (int64_t n = 0; n < d_state; ++n) {
            if (width == BLOCK) {
#pragma omp simd
                for (int64_t e = 0; e < BLOCK; ++e) h[(b * channels + e0 + e) * d_state + n] = state[n][e];
            } else {
                for (int64_t e = 0; e < width; ++e) h[(b * channels + e0 + e) * d_state + n] = state[n][e];
            }
        }
        restore_fp_mode(fp_mode);
    }
}

/* Entry point: the arguments of selective_scan_f32 in order, pointers as integers (0 for NULL),
 * in one array. One argument keeps the ctypes call cheap (about 0.5 us per argument otherwise,
 * which is more than the whole scan of a one-token step). */
void mail_selective_scan_f32(const int64_t *a) {
#define P(i) ((float *)(intptr_t)a[i])
    selective_scan_f32(a[0], a[1], a[2], a[3], P(4), a[5], a[6], P(7), a[8], a[9], P(10), a[11], P(12),
                       P(13), a[14], a[15], P(16), a[17], a[18], P(19), P(20), a[21], a[22], P(23), P(24),
                       a[25], a[26], a[27], P(28), a[29], a[30]);
#undef P
}

/* Causal depthwise convolution with SiLU, continuing from a conv state:
 *
 *     seq     = [conv_state[:, :, 1:], x]            (B, E, K - 1 + L), time along the last axis
 *     out_t   = silu(bias + sum_k weight[:, k] * seq[:, :, t + k])         t = 0 .. L - 1
 *     state'  = seq[:, :, L - 1:]                      the last K inputs, oldest first
 *
 * x (B, L >= 1, E) has contiguous channels (row strides given); out (B, L, E) is contiguous;
 * conv_state (B, E, K) contiguous, or NULL for zeros; new_state (B, E, K) contiguous or NULL,
 * and may be conv_state itself (it is written after all reads). weight (E, K), bias (E) or NULL. */
static void causal_conv_silu_f32(
    int64_t batch, int64_t length, int64_t channels, int64_t width,
    const float *x, int64_t x_sb, int64_t x_sl,
    const float *conv_state, const float *weight, const float *bias,
    float *out, float *new_state, int64_t num_threads)
{
    const int64_t blocks = (channels + BLOCK - 1) / BLOCK;
    const int64_t tasks = batch * blocks;
    const int parallel = num_threads > 1 && tasks > 1 && batch * length * channels * width >= 65536;

#pragma omp parallel for schedule(static) num_threads(num_threads) if (parallel)
    for (int64_t task = 0; task < tasks; ++task) {
        const int64_t b = task / blocks;
        const int64_t e0 = (task % blocks) * BLOCK;
        const int64_t cw = channels - e0 < BLOCK ? channels - e0 : BLOCK;
        const fp_mode_t fp_mode = flush_denormals();
        /* win holds rows [t][e]: the width - 1 inputs before a tile of CONV_TILE steps, then the
         * tile's inputs, so that output t reads rows t .. t + width - 1 (no index arithmetic in
         * the inner loops, which then vectorise over the BLOCK channels). */
        float win[width - 1 + CONV_TILE][BLOCK], wT[width][BLOCK], bv[BLOCK];
        for (int64_t k = 0; k < width; ++k)
            for (int64_t e = 0; e < BLOCK; ++e) wT[k][e] = e < cw ? weight[(e0 + e) * width + k] : 0.0f;
        for (int64_t k = 0; k + 1 < width; ++k) /* the state's oldest input drops out */
            for (int64_t e = 0; e < BLOCK; ++e)
                win[k][e] = conv_state != NULL && e < cw ? conv_state[(b * channels + e0 + e) * width + k + 1] : 0.0f;
        for (int64_t e = 0; e < BLOCK; ++e) bv[e] = bias != NULL && e < cw ? bias[e0 + e] : 0.0f;
        for (int64_t t0 = 0; t0 < length; t0 += CONV_TILE) {
            const int64_t tile = length - t0 < CONV_TILE ? length - t0 : CONV_TILE;
            for (int64_t t = 0; t < tile; ++t) {
                const float *xt = x + b * x_sb + (t0 + t) * x_sl + e0;
                float *row = win[width - 1 + t];
                if (cw == BLOCK) {
#pragma omp simd
                    for (int64_t e = 0; e < BLOCK; ++e) row[e] = xt[e];
                } else {
                    for (int64_t e = 0; e < BLOCK; ++e) row[e] = e < cw ? xt[e] : 0.0f;
                }
            }
            for (int64_t t = 0; t < tile; ++t) {
                float acc[BLOCK];
#pragma omp simd
                for (int64_t e = 0; e < BLOCK; ++e) acc[e] = bv[e];
                for (int64_t k = 0; k < width; ++k) {
#pragma omp simd
                    for (int64_t e = 0; e < BLOCK; ++e) acc[e] += wT[k][e] * win[t + k][e];
                }
                float *ot = out + (b * length + t0 + t) * channels + e0;
                if (cw == BLOCK) {
#pragma omp simd
                    for (int64_t e = 0; e < BLOCK; ++e) ot[e] = silu_ps(acc[e]);
                } else {
#pragma omp simd
                    for (int64_t e = 0; e < BLOCK; ++e) acc[e] = silu_ps(acc[e]);
                    for (int64_t e = 0; e < cw; ++e) ot[e] = acc[e];
                }
            }
            if (t0 + tile < length) {
                /* The tile's last width - 1 inputs become the next tile's context. */
                memmove(win[0], win[tile], (size_t)(width - 1) * BLOCK * sizeof(float));
            } else if (new_state != NULL) {
                /* The last width inputs, oldest first: rows tile - 1 .. tile + width - 2. */
                for (int64_t k = 0; k < width; ++k)
                    for (int64_t e = 0; e < cw; ++e)
                        new_state[(b * channels + e0 + e) * width + k] = win[tile - 1 + k][e];
            }
        }
        restore_fp_mode(fp_mode);
    }
}

/* Entry point, arguments as for mail_selective_scan_f32: one int64 array. */
void mail_causal_conv_silu_f32(const int64_t *a) {
#define P(i) ((float *)(intptr_t)a[i])
    causal_conv_silu_f32(a[0], a[1], a[2], a[3], P(4), a[5], a[6], P(7), P(8), P(9), P(10), P(11), a[12]);
#undef P
}


/* ---------------------------------------------------------------- the whole stack in one call
 *
 * A D-Ma denoising step runs 16 blocks on a handful of tokens; in PyTorch each block is a dozen
 * small calls (LayerNorm, three projections, the two kernels above, state copies) of a few
 * microseconds each, which cost more than their arithmetic. Here one call runs the stack:
 *
 *     for each block:  x = x + out_proj(scan(silu(conv(u)), x_proj(...)) * silu(z)) [+ memory]
 *                      with u, z = in_proj(LayerNorm(x))
 *     out = LayerNorm_final(x)
 *
 * reusing the scan and conv kernels above; the projections are the small GEMMs below. */

#define PANEL 32 /* output features per packed weight panel: two AVX-512 registers */
#define MR 6      /* rows (tokens) per register tile: 6 x 32 accumulators fit the registers */

/* Pack a weight W (N, K) as nn.Linear holds it into panels (ceil(N / PANEL), K, PANEL), zero
 * padded: a tile then reads its PANEL weights of each k as one contiguous vector. Done once per
 * weight version (the caller caches the packed copy). */
static void pack_panels_f32(int64_t N, int64_t K, const float *W, float *packed)
{
    for (int64_t p = 0; p < (N + PANEL - 1) / PANEL; ++p)
        for (int64_t k = 0; k < K; ++k)
            for (int64_t j = 0; j < PANEL; ++j) {
                const int64_t n = p * PANEL + j;
                packed[(p * K + k) * PANEL + j] = n < N ? W[n * K + k] : 0.0f;
            }
}

/* One tile: mr <= MR rows of C, nr <= PANEL columns, = A rows @ one packed panel (+ bias).
 * Each k broadcasts A[i][k] against the panel's contiguous PANEL weights: no reductions, the
 * accumulators stay in registers. */
static inline void linear_tile(int64_t mr, int64_t nr, int64_t K, const float *A, int64_t lda,
                               const float *panel, const float *bias, float *C, int64_t ldc)
{
    float acc[MR][PANEL];
    for (int64_t i = 0; i < MR; ++i)
        for (int64_t j = 0; j < PANEL; ++j) acc[i][j] = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
        const float *w = panel + k * PANEL;
        for (int64_t i = 0; i < mr; ++i) {
            const float a = A[i * lda + k];
#pragma omp simd
            for (int64_t j = 0; j < PANEL; ++j) acc[i][j] += a * w[j];
        }
    }
    for (int64_t i = 0; i < mr; ++i)
        for (int64_t j = 0; j < nr; ++j) C[i * ldc + j] = acc[i][j] + (bias != NULL ? bias[j] : 0.0f);
}

/* C (M, N) row stride ldc = A (M, K) row stride lda @ W^T + bias (N) or NULL, with W (N, K)
 * given packed by pack_panels_f32. */
static void linear_f32(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, const float *packed,
                       const float *bias, float *C, int64_t ldc, int64_t num_threads)
{
    const int64_t row_tiles = (M + MR - 1) / MR, panels = (N + PANEL - 1) / PANEL;
    const int parallel = num_threads > 1 && row_tiles * panels > 1 && M * N * K >= (1 << 20);
#pragma omp parallel for schedule(static) num_threads(num_threads) if (parallel)
    for (int64_t task = 0; task < row_tiles * panels; ++task) {
        /* Consecutive tasks share a panel, which then stays in cache. */
        const int64_t m0 = (task % row_tiles) * MR, p = task / row_tiles, n0 = p * PANEL;
        const int64_t mr = M - m0 < MR ? M - m0 : MR, nr = N - n0 < PANEL ? N - n0 : PANEL;
        const float *a = A + m0 * lda, *panel = packed + p * K * PANEL, *b = bias != NULL ? bias + n0 : NULL;
        float *c = C + m0 * ldc + n0;
        if (mr == MR)
            linear_tile(MR, nr, K, a, lda, panel, b, c, ldc); /* constant row count: unrolled */
        else
            linear_tile(mr, nr, K, a, lda, panel, b, c, ldc);
    }
}

/* out (M, D) = LayerNorm(x (M, D)) with weight (D) or NULL and bias (D) or NULL, as torch's (biased
 * variance, eps inside the square root). out may be x. */
static void layer_norm_f32(int64_t M, int64_t D, const float *x, const float *weight, const float *bias,
                           float eps, float *out)
{
    for (int64_t m = 0; m < M; ++m) {
        const float *xm = x + m * D;
        float *om = out + m * D;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t d = 0; d < D; ++d) sum += xm[d];
        const float mean = sum / (float)D;
        float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
        for (int64_t d = 0; d < D; ++d) sq += (xm[d] - mean) * (xm[d] - mean);
        const float rstd = 1.0f / sqrtf(sq / (float)D + eps);
#pragma omp simd
        for (int64_t d = 0; d < D; ++d)
            om[d] = (xm[d] - mean) * rstd * (weight != NULL ? weight[d] : 1.0f) + (bias != NULL ? bias[d] : 0.0f);
    }
}

/* The tensors of one block, in the order of LAYER_FIELDS in cpu_kernel.py (NULL where a bias
 * is absent); the in_proj, x_proj and out_proj weights packed by pack_panels_f32. eps is the
 * LayerNorm's, as the bits of a double. */
enum {
    F_NORM_W, F_NORM_B, F_IN_W, F_IN_B, F_CONV_W, F_CONV_B, F_XPROJ_W, F_DT_W, F_DT_B, F_A_LOG, F_D,
    F_OUT_W, F_OUT_B, F_NORM_EPS, LAYER_FIELDS
};
/* A block's states: conv (B, E, K) and scan (B, E, N) before the call (NULL: zeros) and the
 * buffers that receive them after it (NULL: not wanted). */
enum { S_CONV_IN, S_SSM_IN, S_CONV_OUT, S_SSM_OUT, STATE_FIELDS };

static double bits_to_double(int64_t i) { double d; memcpy(&d, &i, sizeof d); return d; }

/* x, out, memory (B, L, D) contiguous; out may be x. Returns 0, or -1 when out of memory
 * (nothing written then). */
static int mamba_stack_f32(
    int64_t batch, int64_t length, int64_t n_layers, int64_t d_model, int64_t d_inner,
    int64_t d_state, int64_t d_conv, int64_t dt_rank, const float *x, float *out, const float *memory,
    const float *final_w, const float *final_b, double final_eps, const int64_t *layers,
    const int64_t *states, int64_t num_threads)
{
    const int64_t M = batch * length, E = d_inner, N = d_state, R = dt_rank, X = R + 2 * N;
    /* Scratch per call: the normed input, in_proj's [u z], the conv output, x_proj's
     * [dt B C], the gated scan output, the residual stream, a scan state nobody wants back. */
    const int64_t sizes[] = {M * d_model, M * 2 * E, M * E, M * X, M * E, M * d_model, batch * E * N};
    int64_t total = 0;
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; ++i) total += sizes[i];
    float *scratch = malloc((size_t)total * sizeof(float));
    if (scratch == NULL) return -1;
    float *xn = scratch, *xz = xn + sizes[0], *uc = xz + sizes[1], *dbc = uc + sizes[2], *y = dbc + sizes[3];
    float *resid = y + sizes[4], *h_scratch = resid + sizes[5];
    memcpy(resid, x, (size_t)M * d_model * sizeof(float));
    for (int64_t layer = 0; layer < n_layers; ++layer) {
        const int64_t *f = layers + layer * LAYER_FIELDS;
        const int64_t *s = states != NULL ? states + layer * STATE_FIELDS : NULL;
#define W(i) ((const float *)(intptr_t)f[i])
        const float *conv_in = s != NULL ? (const float *)(intptr_t)s[S_CONV_IN] : NULL;
        const float *ssm_in = s != NULL ? (const float *)(intptr_t)s[S_SSM_IN] : NULL;
        float *conv_out = s != NULL ? (float *)(intptr_t)s[S_CONV_OUT] : NULL;
        float *h = s != NULL && s[S_SSM_OUT] != 0 ? (float *)(intptr_t)s[S_SSM_OUT] : h_scratch;
        layer_norm_f32(M, d_model, resid, W(F_NORM_W), W(F_NORM_B), (float)bits_to_double(f[F_NORM_EPS]), xn);
        linear_f32(M, 2 * E, d_model, xn, d_model, W(F_IN_W), W(F_IN_B), xz, 2 * E, num_threads);
        causal_conv_silu_f32(batch, length, E, d_conv, xz, length * 2 * E, 2 * E, conv_in, W(F_CONV_W),
                             W(F_CONV_B), uc, conv_out, num_threads);
        linear_f32(M, X, E, uc, E, W(F_XPROJ_W), NULL, dbc, X, num_threads);
        if (ssm_in != NULL)
            memcpy(h, ssm_in, (size_t)batch * E * N * sizeof(float));
        else
            memset(h, 0, (size_t)batch * E * N * sizeof(float));
        selective_scan_f32(batch, length, E, N, uc, length * E, E, dbc, length * X, X, W(F_DT_B), 1,
                           W(F_A_LOG), dbc + R, length * X, X, dbc + R + N, length * X, X, W(F_D),
                           xz + E, length * 2 * E, 2 * E, h, y, length * E, E, num_threads, W(F_DT_W), R, 1);
        /* out_proj into xn (free again), then the residual add (and ED-Ma's memory). */
        linear_f32(M, d_model, E, y, E, W(F_OUT_W), W(F_OUT_B), xn, d_model, num_threads);
#undef W
        for (int64_t i = 0; i < M * d_model; ++i) resid[i] += xn[i];
        if (memory != NULL)
            for (int64_t i = 0; i < M * d_model; ++i) resid[i] += memory[i];
    }
    layer_norm_f32(M, d_model, resid, final_w, final_b, (float)final_eps, out);
    free(scratch);
    return 0;
}

/* Entry point: arguments of mamba_stack_f32 in order, pointers as integers (0 for NULL), the
 * final eps as the bits of a double; the result is written to a[17]. */
void mail_mamba_stack_f32(int64_t *a) {
#define P(i) ((float *)(intptr_t)a[i])
    a[17] = mamba_stack_f32(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], P(8), P(9), P(10), P(11), P(12),
                            bits_to_double(a[13]), (const int64_t *)(intptr_t)a[14],
                            (const int64_t *)(intptr_t)a[15], a[16]);
#undef P
}

/* Panel width of the packed weights (the caller sizes the packed buffers with it). */
int64_t mail_linear_panel(void) { return PANEL; }

/* Entry point: a[0] N, a[1] K, a[2] W (N, K), a[3] packed (ceil(N / PANEL), K, PANEL). */
void mail_pack_panels_f32(const int64_t *a) {
    pack_panels_f32(a[0], a[1], (const float *)(intptr_t)a[2], (float *)(intptr_t)a[3]);
}
