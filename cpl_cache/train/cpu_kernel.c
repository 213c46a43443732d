/* The CPU kernels of stage two's step, for float32: one pass per row where torch takes several.
 *
 * cpl_logit_grad: every loss's closed-form gradient in the logits (cpl_cache.train.losses). torch runs
 * one as 5-8 passes over the (B, K) logits (max, softmax, mask, tie check, lerp, sub), each a separate
 * kernel, after a gather of the weak softmax's rows into a buffer; here each row is read into L1 once
 * and its weak row is read straight from the per-domain table.
 * cpl_scaled_rows, cpl_scaled_rows_backward: the proto head's scaled normalisation of the prototypes
 * and its backward (cpl_cache.train.heads), four and three passes over (K, D) in torch.
 * The same arithmetic as torch's up to float32 rounding: tests/test_cpu_kernel.py holds them to it.
 *
 * Built by cpu_kernel.py with the machine's C compiler and OpenMP (torch's own runtime, shared by soname).
 */
#include <math.h>
#include <stdint.h>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

enum { SOFT = 0, SELF_MIX = 1, ADAPT = 2, HARD = 3 };
/* How many rows ahead the weak rows are prefetched: 3 took 7-8% off the kernel's time in training
 * (0.80 against 0.86 ms at B = 1024, K = 345 on 2 cores); 1 did not measurably. */
#define AHEAD 3

/* exp(x) for x <= 0: 2^n * p(r), r = x - n ln 2 in [-ln2/2, ln2/2], p of degree 6 (Cephes' expf, within
 * 2 ulp), written so that the compiler vectorises it. Clamped below at -87 so that the result stays a
 * normal float (exp(-87) = 1.6e-38): a softmax term that small is zero to every later sum. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union {
        int32_t i;
        float f;
    } two_n;
    two_n.i = ((int32_t)n + 127) << 23;
    return p * two_n.f;
}

/* Over s (B, K), in place: s[i] <- softmax(s[i]) - target_i, the loss's gradient summed over rows, with
 *   SOFT      target_i = probs[idx[i]]                      (soft, kd at T = 1)
 *   SELF_MIX  target_i = (1 - coef) probs[idx[i]] + coef onehot(argmax s[i])      (auxconf, augconf)
 *   ADAPT     the same with coef_i = sigmoid((s[i][top[idx[i]]] - max s[i]) / tau)       (adaptconf)
 *   HARD      target_i = onehot(top[idx[i]])                                     (hard: the ceilings)
 * probs (N, K) and top (N,) are the targets' softmax and argmax per train row; argmax takes the first of
 * tied maxima, as torch's does. Rows are split statically over `threads` threads, so a result does not
 * depend on scheduling. Returns the number of rows whose idx or top lies out of range (left untouched):
 * 0 unless the caller passed a bad index. */
int64_t cpl_logit_grad(float *s, int64_t B, int64_t K, const float *probs, const int64_t *top, int64_t N,
                       const int64_t *idx, int mode, float coef, float tau, int threads) {
    int64_t bad = 0;
#pragma omp parallel num_threads(threads) reduction(+ : bad)
    {
#if defined(__SSE__)
        /* Flush subnormal floats to zero in this thread (a confident weak softmax is full of them, and x86
         * handles them tens of times slower); restored on the way out. */
        unsigned int csr = _mm_getcsr();
        _mm_setcsr(csr | 0x8040);
#endif
#pragma omp for schedule(static)
        for (int64_t i = 0; i < B; i++) {
            int64_t row = idx[i];
            if (row < 0 || row >= N || (top != 0 && (top[row] < 0 || top[row] >= K))) {
                bad++;
                continue;
            }
            int64_t ahead = i + AHEAD < B ? idx[i + AHEAD] : -1;
            if (probs != 0 && ahead >= 0 && ahead < N) {
                /* The weak rows lie scattered over the table, and the hardware prefetcher follows a row
                 * only after missing on it: ask for the row AHEAD rows on while this one computes. */
                const char *next = (const char *)(probs + ahead * K);
                for (int64_t b = 0; b < K * (int64_t)sizeof(float); b += 64) __builtin_prefetch(next + b, 0, 3);
            }
            float *si = s + i * K;
            float m = si[0];
            for (int64_t j = 1; j < K; j++) m = si[j] > m ? si[j] : m;
            float c = mode == SELF_MIX ? coef : 0.0f;
            if (mode == ADAPT) c = 1.0f / (1.0f + expf((m - si[top[row]]) / tau));
            /* The first index of the maximum, as a vectorised minimum over the indices that hold it (a
             * scalar scan with an early exit takes twice as long); 0 should s hold a NaN. */
            int32_t first = (int32_t)K;
            if (mode == SELF_MIX || mode == ADAPT) {
#pragma omp simd reduction(min : first)
                for (int32_t j = 0; j < (int32_t)K; j++) {
                    int32_t at = si[j] == m ? j : (int32_t)K;
                    first = at < first ? at : first;
                }
            }
            first = first == (int32_t)K ? 0 : first;
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < K; j++) {
                float e = exp_nonpositive(si[j] - m);
                si[j] = e;
                sum += e;
            }
            float inv = 1.0f / sum;
            if (mode == HARD) {
#pragma omp simd
                for (int64_t j = 0; j < K; j++) si[j] *= inv;
                si[top[row]] -= 1.0f;
                continue;
            }
            const float *pi = probs + row * K;
            float keep = 1.0f - c;
#pragma omp simd
            for (int64_t j = 0; j < K; j++) si[j] = si[j] * inv - keep * pi[j];
            si[first] -= c;
        }
#if defined(__SSE__)
        _mm_setcsr(csr);
#endif
    }
    return bad;
}

/* The prototypes' normalisation (heads.ProtoHead), per row of p (K, D): f = scale / max(||p||, 1e-12) and
 * w = f p. torch takes four passes and as many thread launches over (K, D) for it. */
void cpl_scaled_rows(const float *restrict p, int64_t K, int64_t D, float scale, float *restrict w,
                     float *restrict f, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t k = 0; k < K; k++) {
        const float *pk = p + k * D;
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t j = 0; j < D; j++) ss += pk[j] * pk[j];
        float norm = sqrtf(ss);
        float fk = scale / (norm > 1e-12f ? norm : 1e-12f);
        f[k] = fk;
#pragma omp simd
        for (int64_t j = 0; j < D; j++) w[k * D + j] = pk[j] * fk;
    }
}

/* Its backward, over G (K, D) in place: with u = w / scale the unit rows, G <- alpha f (G - u (u . G))
 * per row: d(scale u)/dp applied to alpha G. */
void cpl_scaled_rows_backward(const float *restrict w, const float *restrict f, float scale,
                              float *restrict G, int64_t K, int64_t D, float alpha, int threads) {
    float inv_sq = 1.0f / (scale * scale);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t k = 0; k < K; k++) {
        const float *wk = w + k * D;
        float *gk = G + k * D;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < D; j++) dot += wk[j] * gk[j];
        float along = dot * inv_sq, fk = f[k] * alpha;
#pragma omp simd
        for (int64_t j = 0; j < D; j++) gk[j] = (gk[j] - wk[j] * along) * fk;
    }
}
