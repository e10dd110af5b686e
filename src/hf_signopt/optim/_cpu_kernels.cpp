// Fused single-pass CPU step kernels for the hf_signopt sign optimizers.
//
// Each kernel reads every parameter, gradient and state element once and writes the parameter and
// state once. `parallel_chunks` splits every tensor of a call into one contiguous chunk per OpenMP
// thread; the per-chunk loops take __restrict pointers so that the compiler vectorises them, except
// for float32 Simba, whose loop is written with AVX2 intrinsics where the build allows.
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
#include <limits>
#include <type_traits>

// With AVX2 and FMA (-mavx2 -mfma), the float32 Simba kernels run a hand-vectorised loop (simba_avx2);
// every other build, and the other kernels, use the plain loops below, which the compiler vectorises.
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HFSO_AVX2 1
#endif

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

#ifdef HFSO_AVX2
// The compiler vectorises the mixed float/int8 Simba loop with the counter logic in 32-bit lanes:
// ~6 instructions an element, with spills, so many that the out-of-order window holds too few loads
// to keep memory busy (1.3x its bound, where Lion's loop reaches 1.0x). Here the counter logic runs
// in the counters' own width, 32 int8 or 16 int16 lanes an instruction, and only the update u in
// {-1, 0, 1} is widened to float: ~2.75 instructions an element.

// One __m256i of counters: 32 int8 or 16 int16, the elements of kFloats vectors of 8 floats.
template <class I>
struct CounterVec;

template <>
struct CounterVec<int8_t> {
    static constexpr int kFloats = 4;
    static __m256i set1(int32_t x) { return _mm256_set1_epi8(static_cast<char>(x)); }  // 128 -> 0x80
    // |s| > k, compared unsigned so that |-128| (0x80) counts as 128: max(|s|, k + 1) == |s|.
    static __m256i abs_greater(__m256i s, __m256i k_plus_1) {
        const __m256i a = _mm256_abs_epi8(s);
        return _mm256_cmpeq_epi8(_mm256_max_epu8(a, k_plus_1), a);
    }
    static __m256i sign(__m256i s) { return _mm256_sign_epi8(_mm256_set1_epi8(1), s); }
    static __m256i adds(__m256i a, __m256i b) { return _mm256_adds_epi8(a, b); }
    static __m256i clamp(__m256i s, __m256i lo, __m256i hi) { return _mm256_max_epi8(_mm256_min_epi8(s, hi), lo); }
    static __m256i equal(__m256i a, __m256i b) { return _mm256_cmpeq_epi8(a, b); }
    // Four vectors of 8 int32 in [-128, 127] (x[0]: elements 0-7, ...) to 32 int8. The packs work
    // within each 128-bit half and leave the groups of 4 elements in the order 0 2 4 6 1 3 5 7;
    // one cross-lane permute puts them back in order.
    static __m256i pack(const __m256i* x) {
        const __m256i x01 = _mm256_packs_epi32(x[0], x[1]), x23 = _mm256_packs_epi32(x[2], x[3]);
        return _mm256_permutevar8x32_epi32(_mm256_packs_epi16(x01, x23), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    }
    // The inverse: 32 int8 sign-extended to four vectors of 8 int32.
    static void widen(__m256i x, __m256i* out) {
        const __m128i lo = _mm256_castsi256_si128(x), hi = _mm256_extracti128_si256(x, 1);
        out[0] = _mm256_cvtepi8_epi32(lo);
        out[1] = _mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8));
        out[2] = _mm256_cvtepi8_epi32(hi);
        out[3] = _mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8));
    }
};

template <>
struct CounterVec<int16_t> {
    static constexpr int kFloats = 2;
    static __m256i set1(int32_t x) { return _mm256_set1_epi16(static_cast<short>(x)); }  // 32768 -> 0x8000
    static __m256i abs_greater(__m256i s, __m256i k_plus_1) {  // as for int8: |-32768| counts as 32768
        const __m256i a = _mm256_abs_epi16(s);
        return _mm256_cmpeq_epi16(_mm256_max_epu16(a, k_plus_1), a);
    }
    static __m256i sign(__m256i s) { return _mm256_sign_epi16(_mm256_set1_epi16(1), s); }
    static __m256i adds(__m256i a, __m256i b) { return _mm256_adds_epi16(a, b); }
    static __m256i clamp(__m256i s, __m256i lo, __m256i hi) { return _mm256_max_epi16(_mm256_min_epi16(s, hi), lo); }
    static __m256i equal(__m256i a, __m256i b) { return _mm256_cmpeq_epi16(a, b); }
    // Two vectors of 8 int32 to 16 int16: the pack leaves the groups of 4 in the order 0 2 1 3.
    static __m256i pack(const __m256i* x) {
        return _mm256_permute4x64_epi64(_mm256_packs_epi32(x[0], x[1]), _MM_SHUFFLE(3, 1, 2, 0));
    }
    static void widen(__m256i x, __m256i* out) {
        out[0] = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(x));
        out[1] = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(x, 1));
    }
};

// sign(x) in {-1, 0, 1} per int32 lane: compares give -1 where true, so [x > 0] - [x < 0] = lt - gt.
inline __m256i sign_epi32(__m256 x) {
    const __m256 zero = _mm256_setzero_ps();
    return _mm256_sub_epi32(_mm256_castps_si256(_mm256_cmp_ps(x, zero, _CMP_LT_OQ)),
                            _mm256_castps_si256(_mm256_cmp_ps(x, zero, _CMP_GT_OQ)));
}

// -1 where x is NaN or +-inf (all exponent bits set), else 0, as in is_finite.
inline __m256i not_finite_epi32(__m256 x) {
    const __m256i exponent = _mm256_set1_epi32(0x7f800000);
    return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(x), exponent), exponent);
}

inline int32_t sum_epi32(__m256i x) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

// Software prefetch distance, in elements (1 KiB of each float stream). With two cores sharing the
// memory bandwidth, prefetching the float streams this far ahead measured 5-10% faster than leaving
// them to the hardware prefetchers; the int8/int16 counter stream is left to them. (A prefetch past
// the end of a tensor is harmless: prefetches never fault.)
constexpr int64_t kPrefetch = 256;

// The loop of simba_counts_chunk<F32, I> (m == nullptr) or simba_ema_chunk<F32, I> over whole
// counter vectors, with the same results bit for bit. Returns the number of elements done (the
// caller finishes the rest: all of them where k + 1 or +-w would not fit the counter type, which
// never happens with the optimizer's state) and adds the skipped (non-finite) ones to *bad; the
// count stays in a register until the end.
template <class I, bool kEma>
int64_t simba_avx2(int64_t len, float* __restrict p, const float* __restrict g, I* __restrict s,
                   float* __restrict m, float lr, float decay, int32_t threshold, int32_t window, float beta,
                   int32_t* bad) {
    constexpr int32_t kMax = std::numeric_limits<I>::max();
    if (threshold < 0 || threshold > kMax || window < 0 || window > kMax) return 0;
    using V = CounterVec<I>;
    constexpr int kFloats = V::kFloats;
    constexpr int64_t kStep = 8 * kFloats;
    const __m256 lr_v = _mm256_set1_ps(lr), decay_v = _mm256_set1_ps(decay);
    const __m256 beta_v = _mm256_set1_ps(beta), one_minus_beta_v = _mm256_set1_ps(1.0f - beta);
    const __m256i k_plus_1 = V::set1(threshold + 1), hi = V::set1(window), lo = V::set1(-window);
    // sign(g) is packed with a marker 2 where g is not finite, which gives the skip mask in the counter width.
    const __m256i marker_epi32 = _mm256_set1_epi32(2), marker = V::set1(2);
    __m256i skipped = _mm256_setzero_si256();  // minus the skipped elements, per int32 lane
    int64_t i = 0;
    for (; i + kStep <= len; i += kStep) {
        __m256i grad_sign[kFloats], skip[kFloats], history_sign[kFloats];
        for (int j = 0; j < kFloats; ++j) {
            const int64_t at = i + 8 * j;
            if (j % 2 == 0) {  // one cache line of 16 floats
                _mm_prefetch(reinterpret_cast<const char*>(g + at + kPrefetch), _MM_HINT_T0);
                _mm_prefetch(reinterpret_cast<const char*>(p + at + kPrefetch), _MM_HINT_T0);
                if constexpr (kEma) _mm_prefetch(reinterpret_cast<const char*>(m + at + kPrefetch), _MM_HINT_T0);
            }
            const __m256 gv = _mm256_loadu_ps(g + at);
            skip[j] = not_finite_epi32(gv);
            grad_sign[j] = _mm256_blendv_epi8(sign_epi32(gv), marker_epi32, skip[j]);
            skipped = _mm256_add_epi32(skipped, skip[j]);
            if constexpr (kEma) {  // sign(m) for u, then m <- beta*m + (1-beta)*g where g is finite
                const __m256 mv = _mm256_loadu_ps(m + at);
                history_sign[j] = sign_epi32(mv);
                // fma((1-beta), g, beta*m): how GCC contracts the loop's beta*m + (1-beta)*g.
                const __m256 m_new = _mm256_fmadd_ps(one_minus_beta_v, gv, _mm256_mul_ps(beta_v, mv));
                _mm256_storeu_ps(m + at, _mm256_blendv_ps(m_new, mv, _mm256_castsi256_ps(skip[j])));
            }
        }
        __m256i* const s_at = reinterpret_cast<__m256i*>(s + i);
        const __m256i sv = _mm256_loadu_si256(s_at), gs = V::pack(grad_sign);
        __m256i history;  // sign(m) or sign(s)
        if constexpr (kEma) history = V::pack(history_sign);
        else history = V::sign(sv);
        const __m256i u = _mm256_blendv_epi8(gs, history, V::abs_greater(sv, k_plus_1));
        // s + sign(g) saturates at the dtype's limits, which does not change its clamp to [-w, w].
        const __m256i s_new = V::clamp(V::adds(sv, gs), lo, hi);
        _mm256_storeu_si256(s_at, _mm256_blendv_epi8(s_new, sv, V::equal(gs, marker)));
        __m256i u_epi32[kFloats];
        V::widen(u, u_epi32);
        for (int j = 0; j < kFloats; ++j) {
            // p*decay - lr*u: the product lr*u is exact, so the fused multiply-add rounds once, as the loop does.
            const __m256 pv = _mm256_loadu_ps(p + i + 8 * j);
            const __m256 p_new = _mm256_fnmadd_ps(lr_v, _mm256_cvtepi32_ps(u_epi32[j]), _mm256_mul_ps(pv, decay_v));
            _mm256_storeu_ps(p + i + 8 * j, _mm256_blendv_ps(p_new, pv, _mm256_castsi256_ps(skip[j])));
        }
    }
    *bad -= sum_epi32(skipped);
    return i;
}
#endif

// Simba, counts: u = sign(s) if |s| > threshold else sign(g); p <- p*decay - lr*u;
// s <- clamp(s + sign(g), -w, w).
template <class C, class I, class S = typename C::storage>
HFSO_NOINLINE int32_t simba_counts_chunk(int64_t len, S* __restrict p, const S* __restrict g, I* __restrict s,
                                         float lr, float decay, int32_t threshold, int32_t window) {
    int32_t bad = 0;
    int64_t i = 0;
#ifdef HFSO_AVX2
    if constexpr (std::is_same_v<C, F32>)
        i = simba_avx2<I, false>(len, p, g, s, nullptr, lr, decay, threshold, window, 0.0f, &bad);
#endif
    for (; i < len; ++i) {
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
    int64_t i = 0;
#ifdef HFSO_AVX2
    if constexpr (std::is_same_v<C, F32>)
        i = simba_avx2<I, true>(len, p, g, s, m, lr, decay, threshold, window, beta, &bad);
#endif
    for (; i < len; ++i) {
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

// ---- Loss-free MoE balancing (hf_signopt/moe/balancer.py): one call per bias update ----
// The counts and biases are a few hundred numbers: the loop is tiny, and exists to replace seven small torch operations
// (each a dispatch and a few cache misses on the CPU, inside a training step) with one call.

// The "sign" (rule 0) and "linear" (rule 1) increments of `bias_update` (hf_signopt/bias_balancing.py) for rows of
// `experts` int64 counts, added to each layer's float32 bias. The arithmetic is torch's, rounding for rounding:
// shortfall = total - experts * load (int64); sign: float(sign(shortfall)) * rate; linear:
// (float(shortfall) / float(max(total, 1))) * rate; then bias + increment. The increment is stored (volatile) so that
// no compiler contracts the two into a fused multiply-add, which would round once where torch rounds twice.
extern "C" void hfso_bias_update_float32(int64_t layers, int64_t experts, const int64_t* counts, float* const* biases,
                                         int32_t rule, float rate) {
    for (int64_t l = 0; l < layers; ++l) {
        const int64_t* row = counts + l * experts;
        float* bias = biases[l];
        int64_t total = 0;
        for (int64_t e = 0; e < experts; ++e) total += row[e];
        const float divisor = static_cast<float>(std::max<int64_t>(total, 1));
        for (int64_t e = 0; e < experts; ++e) {
            const int64_t shortfall = total - experts * row[e];
            volatile float increment = rule == 0 ? static_cast<float>((shortfall > 0) - (shortfall < 0)) * rate
                                                 : (static_cast<float>(shortfall) / divisor) * rate;
            bias[e] = bias[e] + increment;
        }
    }
}
