// Fused single-pass CPU step kernels for the hf_signopt sign optimizers.
//
// Each kernel reads every parameter, gradient and state element once and writes the parameter and
// state once. `parallel_chunks` splits every tensor of a call into one contiguous chunk per OpenMP
// thread; the per-chunk loops take __restrict pointers so that the compiler vectorises them.
// Arithmetic is in float32; bfloat16 storage is converted on load and rounded to nearest-even on
// store, like torch. An element whose gradient is not finite keeps its parameter and state bit for
// bit, and is counted into *nonfinite (an int64 the caller owns).
//
// Built on first use by hf_signopt/optim/_cpu_kernels.py; the exported C symbols are declared there.

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>

#define HFSO_NOINLINE __attribute__((noinline))

namespace {

constexpr int64_t kParallelMinElements = 1 << 15;
constexpr int64_t kChunkAlign = 64;  // elements; keeps chunk borders on cache lines for 1-byte state
constexpr int64_t kBlock = 1 << 20;  // elements per kernel call, so per-call skip counts fit in int32

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

// Calls chunk(t, begin, end) -> skipped count over this thread's share of every tensor t, in blocks of
// at most kBlock elements (the kernels count in int32, which keeps their loops in 32-bit lanes).
template <class Chunk>
int64_t parallel_chunks(int64_t n, const int64_t* numel, Chunk chunk) {
    int64_t total = 0;
    for (int64_t t = 0; t < n; ++t) total += numel[t];
    int64_t bad = 0;
#pragma omp parallel if (total >= kParallelMinElements) reduction(+ : bad)
    {
#ifdef _OPENMP
        const int64_t threads = omp_get_num_threads(), id = omp_get_thread_num();
#else
        const int64_t threads = 1, id = 0;
#endif
        for (int64_t t = 0; t < n; ++t) {
            const int64_t share = ((numel[t] + threads - 1) / threads + kChunkAlign - 1) / kChunkAlign * kChunkAlign;
            const int64_t begin = std::min(numel[t], share * id), end = std::min(numel[t], begin + share);
            for (int64_t b = begin; b < end; b += kBlock) bad += chunk(t, b, std::min(end, b + kBlock));
        }
    }
    return bad;
}

// Lion: c = b1*m + (1-b1)*g; p <- p*decay - lr*sign(c); m <- b2*m + (1-b2)*g.
template <class C, class S = typename C::storage>
HFSO_NOINLINE int32_t lion_chunk(int64_t len, S* __restrict p, const S* __restrict g, S* __restrict m, float lr,
                                 float decay, float b1, float b2) {
    const float omb1 = 1.0f - b1, omb2 = 1.0f - b2;
    int32_t bad = 0;
    for (int64_t i = 0; i < len; ++i) {
        const S p_raw = p[i], m_raw = m[i];
        const float gv = C::load(g[i]), pv = C::load(p_raw), mv = C::load(m_raw);
        const bool ok = is_finite(gv);
        const S p_new = C::store(pv * decay - lr * sign_of(b1 * mv + omb1 * gv));
        const S m_new = C::store(b2 * mv + omb2 * gv);
        p[i] = ok ? p_new : p_raw;
        m[i] = ok ? m_new : m_raw;
        bad += !ok;
    }
    return bad;
}

// Signum: m <- mu*m + (1-mu)*g; p <- p*decay - lr*sign(m).
template <class C, class S = typename C::storage>
HFSO_NOINLINE int32_t signum_chunk(int64_t len, S* __restrict p, const S* __restrict g, S* __restrict m, float lr,
                                   float decay, float mu) {
    const float omm = 1.0f - mu;
    int32_t bad = 0;
    for (int64_t i = 0; i < len; ++i) {
        const S p_raw = p[i], m_raw = m[i];
        const float gv = C::load(g[i]), pv = C::load(p_raw), mv = C::load(m_raw);
        const bool ok = is_finite(gv);
        const S m_new = C::store(mu * mv + omm * gv);
        const S p_new = C::store(pv * decay - lr * sign_of(C::load(m_new)));
        p[i] = ok ? p_new : p_raw;
        m[i] = ok ? m_new : m_raw;
        bad += !ok;
    }
    return bad;
}

// signSGD: p <- p*decay - lr*sign(g).
template <class C, class S = typename C::storage>
HFSO_NOINLINE int32_t signsgd_chunk(int64_t len, S* __restrict p, const S* __restrict g, float lr, float decay) {
    int32_t bad = 0;
    for (int64_t i = 0; i < len; ++i) {
        const S p_raw = p[i];
        const float gv = C::load(g[i]), pv = C::load(p_raw);
        const bool ok = is_finite(gv);
        const S p_new = C::store(pv * decay - lr * sign_of(gv));
        p[i] = ok ? p_new : p_raw;
        bad += !ok;
    }
    return bad;
}

// SignMomentum: m <- mu*m + (1-mu)*sign(g); p <- p*decay - lr*m.
template <class C, class S = typename C::storage>
HFSO_NOINLINE int32_t sign_momentum_chunk(int64_t len, S* __restrict p, const S* __restrict g, S* __restrict m,
                                          float lr, float decay, float mu) {
    const float omm = 1.0f - mu;
    int32_t bad = 0;
    for (int64_t i = 0; i < len; ++i) {
        const S p_raw = p[i], m_raw = m[i];
        const float gv = C::load(g[i]), pv = C::load(p_raw), mv = C::load(m_raw);
        const bool ok = is_finite(gv);
        const S m_new = C::store(mu * mv + omm * sign_of(gv));
        const S p_new = C::store(pv * decay - lr * C::load(m_new));
        p[i] = ok ? p_new : p_raw;
        m[i] = ok ? m_new : m_raw;
        bad += !ok;
    }
    return bad;
}

// Simba, counts: u = sign(s) if |s| > threshold else sign(g); p <- p*decay - lr*u;
// s <- clamp(s + sign(g), -w, w).
template <class C, class I, class S = typename C::storage>
HFSO_NOINLINE int32_t simba_counts_chunk(int64_t len, S* __restrict p, const S* __restrict g, I* __restrict s,
                                         float lr, float decay, int32_t threshold, int32_t window) {
    int32_t bad = 0;
    for (int64_t i = 0; i < len; ++i) {
        const S p_raw = p[i];
        const I s_raw = s[i];
        const float gv = C::load(g[i]), pv = C::load(p_raw);
        const bool ok = is_finite(gv);
        const int32_t sv = s_raw, gs = (gv > 0.0f) - (gv < 0.0f);
        const int32_t u = (sv < 0 ? -sv : sv) > threshold ? (sv > 0) - (sv < 0) : gs;
        const S p_new = C::store(pv * decay - lr * static_cast<float>(u));
        const int32_t s_new = std::min(window, std::max(-window, sv + gs));
        p[i] = ok ? p_new : p_raw;
        s[i] = ok ? static_cast<I>(s_new) : s_raw;
        bad += !ok;
    }
    return bad;
}

// Simba, ema: u = sign(m) if |s| > threshold else sign(g); p <- p*decay - lr*u;
// m <- beta*m + (1-beta)*g; s <- clamp(s + sign(g), -w, w).
template <class C, class I, class S = typename C::storage>
HFSO_NOINLINE int32_t simba_ema_chunk(int64_t len, S* __restrict p, const S* __restrict g, I* __restrict s,
                                      S* __restrict m, float lr, float decay, int32_t threshold, int32_t window,
                                      float beta) {
    const float omb = 1.0f - beta;
    int32_t bad = 0;
    for (int64_t i = 0; i < len; ++i) {
        const S p_raw = p[i], m_raw = m[i];
        const I s_raw = s[i];
        const float gv = C::load(g[i]), pv = C::load(p_raw), mv = C::load(m_raw);
        const bool ok = is_finite(gv);
        const int32_t sv = s_raw, gs = (gv > 0.0f) - (gv < 0.0f);
        const float u = (sv < 0 ? -sv : sv) > threshold ? sign_of(mv) : static_cast<float>(gs);
        const S p_new = C::store(pv * decay - lr * u);
        const S m_new = C::store(beta * mv + omb * gv);
        const int32_t s_new = std::min(window, std::max(-window, sv + gs));
        p[i] = ok ? p_new : p_raw;
        m[i] = ok ? m_new : m_raw;
        s[i] = ok ? static_cast<I>(s_new) : s_raw;
        bad += !ok;
    }
    return bad;
}

template <class T>
inline T* at(void* const* pointers, int64_t t, int64_t offset) {
    return static_cast<T*>(pointers[t]) + offset;
}

}  // namespace

#define HFSO_EXPORT_FLOAT_KERNELS(SUFFIX, CODEC)                                                                \
    extern "C" void hfso_lion_##SUFFIX(int64_t n, void* const* P, void* const* G, void* const* M,               \
                                       const int64_t* numel, float lr, float decay, float b1, float b2,        \
                                       int64_t* nonfinite) {                                                    \
        using S = CODEC::storage;                                                                               \
        *nonfinite += parallel_chunks(n, numel, [&](int64_t t, int64_t b, int64_t e) {                          \
            return lion_chunk<CODEC>(e - b, at<S>(P, t, b), at<S>(G, t, b), at<S>(M, t, b), lr, decay, b1, b2); \
        });                                                                                                     \
    }                                                                                                           \
    extern "C" void hfso_signum_##SUFFIX(int64_t n, void* const* P, void* const* G, void* const* M,             \
                                         const int64_t* numel, float lr, float decay, float mu,                \
                                         int64_t* nonfinite) {                                                  \
        using S = CODEC::storage;                                                                               \
        *nonfinite += parallel_chunks(n, numel, [&](int64_t t, int64_t b, int64_t e) {                          \
            return signum_chunk<CODEC>(e - b, at<S>(P, t, b), at<S>(G, t, b), at<S>(M, t, b), lr, decay, mu);   \
        });                                                                                                     \
    }                                                                                                           \
    extern "C" void hfso_signsgd_##SUFFIX(int64_t n, void* const* P, void* const* G, const int64_t* numel,      \
                                          float lr, float decay, int64_t* nonfinite) {                          \
        using S = CODEC::storage;                                                                               \
        *nonfinite += parallel_chunks(n, numel, [&](int64_t t, int64_t b, int64_t e) {                          \
            return signsgd_chunk<CODEC>(e - b, at<S>(P, t, b), at<S>(G, t, b), lr, decay);                      \
        });                                                                                                     \
    }                                                                                                           \
    extern "C" void hfso_sign_momentum_##SUFFIX(int64_t n, void* const* P, void* const* G, void* const* M,      \
                                                const int64_t* numel, float lr, float decay, float mu,         \
                                                int64_t* nonfinite) {                                           \
        using S = CODEC::storage;                                                                               \
        *nonfinite += parallel_chunks(n, numel, [&](int64_t t, int64_t b, int64_t e) {                          \
            return sign_momentum_chunk<CODEC>(e - b, at<S>(P, t, b), at<S>(G, t, b), at<S>(M, t, b), lr, decay, \
                                              mu);                                                              \
        });                                                                                                     \
    }

#define HFSO_EXPORT_SIMBA_KERNEL(SUFFIX, CODEC, INT)                                                            \
    extern "C" void hfso_simba_##SUFFIX(int64_t n, void* const* P, void* const* G, void* const* SC,             \
                                        void* const* M, const int64_t* numel, float lr, float decay,           \
                                        int32_t threshold, int32_t window, float beta, int64_t* nonfinite) {   \
        using S = CODEC::storage;                                                                               \
        *nonfinite += parallel_chunks(n, numel, [&](int64_t t, int64_t b, int64_t e) {                          \
            if (M == nullptr)                                                                                   \
                return simba_counts_chunk<CODEC, INT>(e - b, at<S>(P, t, b), at<S>(G, t, b), at<INT>(SC, t, b), \
                                                      lr, decay, threshold, window);                            \
            return simba_ema_chunk<CODEC, INT>(e - b, at<S>(P, t, b), at<S>(G, t, b), at<INT>(SC, t, b),        \
                                               at<S>(M, t, b), lr, decay, threshold, window, beta);             \
        });                                                                                                     \
    }

HFSO_EXPORT_FLOAT_KERNELS(float32, F32)
HFSO_EXPORT_FLOAT_KERNELS(bfloat16, BF16)
HFSO_EXPORT_SIMBA_KERNEL(float32_int8, F32, int8_t)
HFSO_EXPORT_SIMBA_KERNEL(float32_int16, F32, int16_t)
HFSO_EXPORT_SIMBA_KERNEL(bfloat16_int8, BF16, int8_t)
HFSO_EXPORT_SIMBA_KERNEL(bfloat16_int16, BF16, int16_t)
