// Fused single-pass CPU step kernels for the hf_signopt sign optimizers.
//
// Each kernel reads every parameter, gradient and state element once and writes the parameter and
// state once (OpenMP over elements, loops written to auto-vectorise). Arithmetic is in float32;
// bfloat16 storage is converted on load/store with round-to-nearest-even, like torch.
// An element whose gradient is not finite keeps its parameter and state bit-for-bit, and is
// counted into *nonfinite (a plain int64 the caller owns).
//
// Built on first use by hf_signopt/optim/_cpu_kernels.py; the exported C symbols are listed there.

#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kParallelMinElements = 1 << 15;

struct F32 {
    using storage = float;
    static inline float load(float x) { return x; }
    static inline float store(float x) { return x; }
};

struct BF16 {
    using storage = uint16_t;
    static inline float load(uint16_t x) {
        uint32_t bits = static_cast<uint32_t>(x) << 16;
        float out;
        std::memcpy(&out, &bits, sizeof(out));
        return out;
    }
    static inline uint16_t store(float x) {
        uint32_t bits;
        std::memcpy(&bits, &x, sizeof(bits));
        uint16_t rounded = static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
        return x != x ? static_cast<uint16_t>(0x7fc0u) : rounded;
    }
};

inline bool is_finite(float x) {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof(bits));
    return (bits & 0x7f800000u) != 0x7f800000u;
}

inline float sign_of(float x) { return static_cast<float>((x > 0.0f) - (x < 0.0f)); }
inline int32_t sign_of_int(int32_t x) { return (x > 0) - (x < 0); }

int64_t total_elements(int64_t n, const int64_t* numel) {
    int64_t total = 0;
    for (int64_t t = 0; t < n; ++t) total += numel[t];
    return total;
}

// Lion: c = b1*m + (1-b1)*g; p <- p*decay - lr*sign(c); m <- b2*m + (1-b2)*g.
template <class C>
void lion(int64_t n, void* const* P, void* const* G, void* const* M, const int64_t* numel, float lr,
          float decay, float b1, float b2, int64_t* nonfinite) {
    using S = typename C::storage;
    const float omb1 = 1.0f - b1, omb2 = 1.0f - b2;
    int64_t bad = 0;
#pragma omp parallel if (total_elements(n, numel) >= kParallelMinElements) reduction(+ : bad)
    for (int64_t t = 0; t < n; ++t) {
        S* __restrict p = static_cast<S*>(P[t]);
        const S* __restrict g = static_cast<const S*>(G[t]);
        S* __restrict m = static_cast<S*>(M[t]);
#pragma omp for schedule(static) nowait
        for (int64_t i = 0; i < numel[t]; ++i) {
            const S p_raw = p[i], m_raw = m[i];
            const float gv = C::load(g[i]), pv = C::load(p_raw), mv = C::load(m_raw);
            const bool ok = is_finite(gv);
            const float c = b1 * mv + omb1 * gv;
            const S p_new = C::store(pv * decay - lr * sign_of(c));
            const S m_new = C::store(b2 * mv + omb2 * gv);
            p[i] = ok ? p_new : p_raw;
            m[i] = ok ? m_new : m_raw;
            bad += !ok;
        }
    }
    *nonfinite += bad;
}

// Signum: m <- mu*m + (1-mu)*g; p <- p*decay - lr*sign(m).
template <class C>
void signum(int64_t n, void* const* P, void* const* G, void* const* M, const int64_t* numel, float lr,
            float decay, float mu, int64_t* nonfinite) {
    using S = typename C::storage;
    const float omm = 1.0f - mu;
    int64_t bad = 0;
#pragma omp parallel if (total_elements(n, numel) >= kParallelMinElements) reduction(+ : bad)
    for (int64_t t = 0; t < n; ++t) {
        S* __restrict p = static_cast<S*>(P[t]);
        const S* __restrict g = static_cast<const S*>(G[t]);
        S* __restrict m = static_cast<S*>(M[t]);
#pragma omp for schedule(static) nowait
        for (int64_t i = 0; i < numel[t]; ++i) {
            const S p_raw = p[i], m_raw = m[i];
            const float gv = C::load(g[i]), pv = C::load(p_raw), mv = C::load(m_raw);
            const bool ok = is_finite(gv);
            const S m_new = C::store(mu * mv + omm * gv);
            const S p_new = C::store(pv * decay - lr * sign_of(C::load(m_new)));
            p[i] = ok ? p_new : p_raw;
            m[i] = ok ? m_new : m_raw;
            bad += !ok;
        }
    }
    *nonfinite += bad;
}

// signSGD: p <- p*decay - lr*sign(g).
template <class C>
void signsgd(int64_t n, void* const* P, void* const* G, const int64_t* numel, float lr, float decay,
             int64_t* nonfinite) {
    using S = typename C::storage;
    int64_t bad = 0;
#pragma omp parallel if (total_elements(n, numel) >= kParallelMinElements) reduction(+ : bad)
    for (int64_t t = 0; t < n; ++t) {
        S* __restrict p = static_cast<S*>(P[t]);
        const S* __restrict g = static_cast<const S*>(G[t]);
#pragma omp for schedule(static) nowait
        for (int64_t i = 0; i < numel[t]; ++i) {
            const S p_raw = p[i];
            const float gv = C::load(g[i]), pv = C::load(p_raw);
            const bool ok = is_finite(gv);
            const S p_new = C::store(pv * decay - lr * sign_of(gv));
            p[i] = ok ? p_new : p_raw;
            bad += !ok;
        }
    }
    *nonfinite += bad;
}

// SignMomentum: m <- mu*m + (1-mu)*sign(g); p <- p*decay - lr*m.
template <class C>
void sign_momentum(int64_t n, void* const* P, void* const* G, void* const* M, const int64_t* numel, float lr,
                   float decay, float mu, int64_t* nonfinite) {
    using S = typename C::storage;
    const float omm = 1.0f - mu;
    int64_t bad = 0;
#pragma omp parallel if (total_elements(n, numel) >= kParallelMinElements) reduction(+ : bad)
    for (int64_t t = 0; t < n; ++t) {
        S* __restrict p = static_cast<S*>(P[t]);
        const S* __restrict g = static_cast<const S*>(G[t]);
        S* __restrict m = static_cast<S*>(M[t]);
#pragma omp for schedule(static) nowait
        for (int64_t i = 0; i < numel[t]; ++i) {
            const S p_raw = p[i], m_raw = m[i];
            const float gv = C::load(g[i]), pv = C::load(p_raw), mv = C::load(m_raw);
            const bool ok = is_finite(gv);
            const S m_new = C::store(mu * mv + omm * sign_of(gv));
            const S p_new = C::store(pv * decay - lr * C::load(m_new));
            p[i] = ok ? p_new : p_raw;
            m[i] = ok ? m_new : m_raw;
            bad += !ok;
        }
    }
    *nonfinite += bad;
}

// Simba: u = sign(h) if |s| > threshold else sign(g); p <- p*decay - lr*u;
// [m <- beta*m + (1-beta)*g]; s <- clamp(s + sign(g), -w, w).  h = m with an EMA (EMA=true), else s.
template <class C, class I, bool EMA>
void simba(int64_t n, void* const* P, void* const* G, void* const* SC, void* const* M, const int64_t* numel,
           float lr, float decay, int32_t threshold, int32_t window, float beta, int64_t* nonfinite) {
    using S = typename C::storage;
    const float omb = 1.0f - beta;
    int64_t bad = 0;
#pragma omp parallel if (total_elements(n, numel) >= kParallelMinElements) reduction(+ : bad)
    for (int64_t t = 0; t < n; ++t) {
        S* __restrict p = static_cast<S*>(P[t]);
        const S* __restrict g = static_cast<const S*>(G[t]);
        I* __restrict s = static_cast<I*>(SC[t]);
        S* __restrict m = EMA ? static_cast<S*>(M[t]) : nullptr;
#pragma omp for schedule(static) nowait
        for (int64_t i = 0; i < numel[t]; ++i) {
            const S p_raw = p[i];
            const I s_raw = s[i];
            const float gv = C::load(g[i]), pv = C::load(p_raw);
            const bool ok = is_finite(gv);
            const int32_t sv = s_raw;
            const int32_t gs = (gv > 0.0f) - (gv < 0.0f);
            const bool trusted = (sv < 0 ? -sv : sv) > threshold;
            float history;
            if constexpr (EMA) {
                history = sign_of(C::load(m[i]));
            } else {
                history = static_cast<float>(sign_of_int(sv));
            }
            const float u = trusted ? history : static_cast<float>(gs);
            const S p_new = C::store(pv * decay - lr * u);
            int32_t s_new = sv + gs;
            s_new = s_new > window ? window : (s_new < -window ? -window : s_new);
            p[i] = ok ? p_new : p_raw;
            s[i] = ok ? static_cast<I>(s_new) : s_raw;
            if constexpr (EMA) {
                const S m_raw = m[i];
                const S m_new = C::store(beta * C::load(m_raw) + omb * gv);
                m[i] = ok ? m_new : m_raw;
            }
            bad += !ok;
        }
    }
    *nonfinite += bad;
}

}  // namespace

#define HFSO_EXPORT_FLOAT_KERNELS(SUFFIX, CODEC)                                                               \
    extern "C" void hfso_lion_##SUFFIX(int64_t n, void* const* P, void* const* G, void* const* M,              \
                                       const int64_t* numel, float lr, float decay, float b1, float b2,       \
                                       int64_t* nonfinite) {                                                   \
        lion<CODEC>(n, P, G, M, numel, lr, decay, b1, b2, nonfinite);                                         \
    }                                                                                                          \
    extern "C" void hfso_signum_##SUFFIX(int64_t n, void* const* P, void* const* G, void* const* M,            \
                                         const int64_t* numel, float lr, float decay, float mu,               \
                                         int64_t* nonfinite) {                                                 \
        signum<CODEC>(n, P, G, M, numel, lr, decay, mu, nonfinite);                                           \
    }                                                                                                          \
    extern "C" void hfso_signsgd_##SUFFIX(int64_t n, void* const* P, void* const* G, const int64_t* numel,     \
                                          float lr, float decay, int64_t* nonfinite) {                         \
        signsgd<CODEC>(n, P, G, numel, lr, decay, nonfinite);                                                 \
    }                                                                                                          \
    extern "C" void hfso_sign_momentum_##SUFFIX(int64_t n, void* const* P, void* const* G, void* const* M,     \
                                                const int64_t* numel, float lr, float decay, float mu,        \
                                                int64_t* nonfinite) {                                          \
        sign_momentum<CODEC>(n, P, G, M, numel, lr, decay, mu, nonfinite);                                    \
    }

#define HFSO_EXPORT_SIMBA_KERNEL(SUFFIX, CODEC, INT)                                                           \
    extern "C" void hfso_simba_##SUFFIX(int64_t n, void* const* P, void* const* G, void* const* SC,            \
                                        void* const* M, const int64_t* numel, float lr, float decay,          \
                                        int32_t threshold, int32_t window, float beta, int64_t* nonfinite) {  \
        if (M != nullptr)                                                                                      \
            simba<CODEC, INT, true>(n, P, G, SC, M, numel, lr, decay, threshold, window, beta, nonfinite);    \
        else                                                                                                   \
            simba<CODEC, INT, false>(n, P, G, SC, M, numel, lr, decay, threshold, window, beta, nonfinite);   \
    }

HFSO_EXPORT_FLOAT_KERNELS(float32, F32)
HFSO_EXPORT_FLOAT_KERNELS(bfloat16, BF16)
HFSO_EXPORT_SIMBA_KERNEL(float32_int8, F32, int8_t)
HFSO_EXPORT_SIMBA_KERNEL(float32_int16, F32, int16_t)
HFSO_EXPORT_SIMBA_KERNEL(bfloat16_int8, BF16, int8_t)
HFSO_EXPORT_SIMBA_KERNEL(bfloat16_int16, BF16, int16_t)
