// Paged decode attention for the CPU engine: each decode row's query attends to its sequence's KV where
// it lies in the paged cache (`engine.kv_cache`: flat `[num_slots, kv_heads, head_dim]`, slot =
// block * block_size + offset), with no gather into a contiguous copy.
//
// One work item is (sequence, kv head): the GQA group's query heads are processed together, so each K
// and V row is read once per group. Three passes over the context: scores (q . k, scaled) with a running
// max per head, exp(score - max) and its sum, then the weighted sum of V rows; all in fp32 whatever the
// cache dtype (fp32 or bf16). Work items are handed out longest first from a shared counter inside
// at::parallel_for (torch's own OpenMP pool), so mixed context lengths balance across threads.
//
// Built by `pdserve.engine.kernels` (torch.utils.cpp_extension, -O3 -march=native on the machine that
// runs it) and registered as torch.ops.pdserve.paged_decode_attention.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define PDSERVE_AVX512_BF16 1
#endif

namespace {

// Element loads as fp32. bf16 is the upper half of an fp32: a shift, which vectorises.
inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const c10::BFloat16* p, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  return __builtin_bit_cast(float, bits);
}

// exp(x) for x <= 0 (scores minus their max): Cephes' expf (range reduction by ln 2, degree-6
// polynomial; relative error ~2e-7), branch-free so that it vectorises inside `omp simd` loops.
// Below -87 the result would leave the normal range: it is clamped to ~1e-38, which vanishes
// beside the row's maximum term (1).
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, e);
}

// HD > 0: head_dim known at compile time (64, 128: fully unrolled loops); 0: the runtime `hd`.
template <int64_t HD, typename T>
inline float dot(const float* q, const T* k, int64_t hd) {
  if constexpr (HD > 0) hd = HD;
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < hd; ++i) s += q[i] * load(k, i);
  return s;
}

template <int64_t HD, typename T>
inline void axpy(float* acc, float p, const T* v, int64_t hd) {
  if constexpr (HD > 0) hd = HD;
#pragma omp simd
  for (int64_t i = 0; i < hd; ++i) acc[i] += p * load(v, i);
}

#ifdef PDSERVE_AVX512_BF16
// AVX-512-BF16 paths for a bf16 cache (the default dtype where the CPU has them). The portable loops
// above spend most of their time in one horizontal sum per (query head, key): here the q . k products
// run on VDPBF16PS (bf16 pairs multiplied exactly, summed in fp32) for eight keys at a time, whose
// sixteen-lane partial sums are reduced together by one transpose-and-add tree; the V pass keeps a
// group's accumulators in registers and widens each V row once for the whole group.
namespace avx512 {

using bf16 = c10::BFloat16;

// The totals of eight vectors of sixteen partial sums, as one vector of eight.
inline __m256 sum8(const __m512* a) {
  auto pairs = [](__m512 x, __m512 y) { return _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y)); };
  auto quads = [](__m512 x, __m512 y) {
    const __m512d xd = _mm512_castps_pd(x), yd = _mm512_castps_pd(y);
    return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(xd, yd)), _mm512_castpd_ps(_mm512_unpackhi_pd(xd, yd)));
  };
  const __m512 u0 = quads(pairs(a[0], a[1]), pairs(a[2], a[3]));  // per 128-bit lane: keys 0-3
  const __m512 u1 = quads(pairs(a[4], a[5]), pairs(a[6], a[7]));  // keys 4-7
  const __m512 x = _mm512_add_ps(_mm512_shuffle_f32x4(u0, u1, _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_f32x4(u0, u1, _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 y = _mm512_shuffle_f32x4(x, x, _MM_SHUFFLE(3, 1, 2, 0));
  return _mm256_add_ps(_mm512_castps512_ps256(y), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(y), 1)));
}

inline __m512bh load_bh(const bf16* p) { return (__m512bh)_mm512_loadu_si512(p); }

// Sixteen bf16 widened to fp32.
inline __m512 load16(const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// Pass 1 for one (sequence, kv head): scale * q . k for each query head of the group and each context
// position, into scores[g * ctx + pos]; the max per head into mx.
template <int64_t HD>
void scores(const bf16* const* qrows, int64_t group, const bf16* kp, const int32_t* table, int64_t block_size,
            int64_t ctx, int64_t row, int64_t h, float scale, float* scores, float* mx) {
  constexpr int64_t C = HD / 32;
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int64_t g = 0; g < group; ++g) {
    __m512bh qv[C];
    for (int64_t c = 0; c < C; ++c) qv[c] = load_bh(qrows[g] + 32 * c);
    float* sg = scores + g * ctx;
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    float m = -INFINITY;
    for (int64_t b = 0, pos = 0; pos < ctx; ++b) {
      const bf16* kb = kp + static_cast<int64_t>(table[b]) * block_size * row + h * HD;
      const int64_t len = std::min(block_size, ctx - pos);
      int64_t o = 0;
      for (; o + 8 <= len; o += 8) {
        __m512 acc[8];
        for (int j = 0; j < 8; ++j) {
          const bf16* kr = kb + (o + j) * row;
          acc[j] = _mm512_dpbf16_ps(_mm512_setzero_ps(), qv[0], load_bh(kr));
          for (int64_t c = 1; c < C; ++c) acc[j] = _mm512_dpbf16_ps(acc[j], qv[c], load_bh(kr + 32 * c));
        }
        const __m256 s = _mm256_mul_ps(sum8(acc), vscale);
        _mm256_storeu_ps(sg + pos + o, s);
        vmax = _mm256_max_ps(vmax, s);
      }
      for (; o < len; ++o) {
        const bf16* kr = kb + o * row;
        __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), qv[0], load_bh(kr));
        for (int64_t c = 1; c < C; ++c) acc = _mm512_dpbf16_ps(acc, qv[c], load_bh(kr + 32 * c));
        const float s = _mm512_reduce_add_ps(acc) * scale;
        sg[pos + o] = s;
        m = std::max(m, s);
      }
      pos += len;
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vmax);
    for (float l : lanes) m = std::max(m, l);
    mx[g] = m;
  }
}

// Pass 3 for one (sequence, kv head): acc[g * HD + i] = sum over pos of p[g][pos] * v[pos][i].
template <int64_t HD, int64_t G>
void weighted_values(float* acc_out, const float* probs, int64_t ctx, const bf16* vp, const int32_t* table,
                     int64_t block_size, int64_t row, int64_t h) {
  constexpr int64_t C = HD / 16;
  __m512 acc[G][C];
  for (int64_t g = 0; g < G; ++g)
    for (int64_t c = 0; c < C; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int64_t b = 0, pos = 0; pos < ctx; ++b) {
    const bf16* vb = vp + static_cast<int64_t>(table[b]) * block_size * row + h * HD;
    const int64_t len = std::min(block_size, ctx - pos);
    for (int64_t o = 0; o < len; ++o, ++pos) {
      const bf16* vr = vb + o * row;
      __m512 v[C];
      for (int64_t c = 0; c < C; ++c) v[c] = load16(vr + 16 * c);
      for (int64_t g = 0; g < G; ++g) {
        const __m512 p = _mm512_set1_ps(probs[g * ctx + pos]);
        for (int64_t c = 0; c < C; ++c) acc[g][c] = _mm512_fmadd_ps(p, v[c], acc[g][c]);
      }
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t c = 0; c < C; ++c) _mm512_storeu_ps(acc_out + g * HD + 16 * c, acc[g][c]);
}

// Whether pass 3 has a register-blocked instance for this shape; `weighted_values` dispatched on G.
template <int64_t HD>
constexpr bool has_weighted_values(int64_t group) {
  return HD == 64 ? group >= 1 && group <= 4 : HD == 128 ? group >= 1 && group <= 2 : false;
}

template <int64_t HD>
void weighted_values(int64_t group, float* acc_out, const float* probs, int64_t ctx, const bf16* vp,
                     const int32_t* table, int64_t block_size, int64_t row, int64_t h) {
  switch (group) {
    case 1: return weighted_values<HD, 1>(acc_out, probs, ctx, vp, table, block_size, row, h);
    case 2: return weighted_values<HD, 2>(acc_out, probs, ctx, vp, table, block_size, row, h);
    case 3: if constexpr (HD == 64) return weighted_values<HD, 3>(acc_out, probs, ctx, vp, table, block_size, row, h);
            break;
    case 4: if constexpr (HD == 64) return weighted_values<HD, 4>(acc_out, probs, ctx, vp, table, block_size, row, h);
            break;
  }
  TORCH_CHECK(false, "no register-blocked V pass for group ", group, " and head_dim ", HD);
}

}  // namespace avx512
#endif

template <typename T, int64_t HD>
void decode_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t block_size,
                      double scale_d) {
  const int64_t n = q.size(0), nh = q.size(1), hd = q.size(2);
  const int64_t kvh = k_cache.size(1);
  const int64_t group = nh / kvh;
  const int64_t max_blocks = block_tables.size(1);
  const int64_t q_s0 = q.stride(0), q_s1 = q.stride(1);
  const int64_t o_s0 = out.stride(0), o_s1 = out.stride(1);
  const float scale = static_cast<float>(scale_d);
  const T* qp = q.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  const T* kp = k_cache.const_data_ptr<T>();
  const T* vp = v_cache.const_data_ptr<T>();
  const int32_t* tables = block_tables.const_data_ptr<int32_t>();
  const int32_t* lens = context_lens.const_data_ptr<int32_t>();
  const int64_t row = kvh * hd;  // elements per slot
  const int64_t num_slots = k_cache.size(0);

  int64_t max_ctx = 0;
  for (int64_t s = 0; s < n; ++s) {
    TORCH_CHECK(lens[s] >= 1 && lens[s] <= max_blocks * block_size, "context length ", lens[s], " of row ", s,
                " is outside [1, ", max_blocks * block_size, "]");
    max_ctx = std::max<int64_t>(max_ctx, lens[s]);
    for (int64_t b = 0; b * block_size < lens[s]; ++b) {
      const int64_t blk = tables[s * max_blocks + b];
      TORCH_CHECK(blk >= 0 && (blk + 1) * block_size <= num_slots, "block ", blk, " of row ", s,
                  " is outside the cache");
    }
  }
  // Longest first: items are taken from a shared counter, so the last ones to start are the short ones.
  std::vector<int64_t> order(n);
  for (int64_t s = 0; s < n; ++s) order[s] = s;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return lens[a] > lens[b]; });
  const int64_t items = n * kvh;
  std::atomic<int64_t> next{0};
#ifdef PDSERVE_AVX512_BF16
  // bf16 with a head_dim of a multiple of 32 known at compile time takes the AVX-512-BF16 passes.
  constexpr bool kFastBf16 = std::is_same_v<T, c10::BFloat16> && HD > 0 && HD % 32 == 0;
  bool fast_k = false, fast_v = false;
  if constexpr (kFastBf16) {
    fast_k = group <= 8;
    fast_v = avx512::has_weighted_values<HD>(group);
  }
#endif

  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(group * max_ctx), qf(group * hd), acc(group * hd), mx(group), sum(group);
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t item; (item = next.fetch_add(1, std::memory_order_relaxed)) < items;) {
        const int64_t s = order[item / kvh], h = item % kvh;
        const int64_t ctx = lens[s];
        const int32_t* table = tables + s * max_blocks;
        for (int64_t g = 0; g < group; ++g) {
          const T* qr = qp + s * q_s0 + (h * group + g) * q_s1;
          for (int64_t i = 0; i < hd; ++i) qf[g * hd + i] = load(qr, i) * scale;
          mx[g] = -INFINITY;
        }
        // pass 1: scores and their max, block by block
#ifdef PDSERVE_AVX512_BF16
        if (kFastBf16 && fast_k) {
          if constexpr (kFastBf16) {
            const c10::BFloat16* qrows[8];
            for (int64_t g = 0; g < group; ++g) qrows[g] = qp + s * q_s0 + (h * group + g) * q_s1;
            avx512::scores<HD>(qrows, group, kp, table, block_size, ctx, row, h, scale, scores.data(), mx.data());
          }
        } else
#endif
        for (int64_t b = 0, pos = 0; pos < ctx; ++b) {
          const int64_t base = static_cast<int64_t>(table[b]) * block_size;
          const int64_t len = std::min(block_size, ctx - pos);
          for (int64_t o = 0; o < len; ++o, ++pos) {
            const T* kr = kp + (base + o) * row + h * hd;
            for (int64_t g = 0; g < group; ++g) {
              const float sc = dot<HD>(qf.data() + g * hd, kr, hd);
              scores[g * ctx + pos] = sc;
              mx[g] = std::max(mx[g], sc);
            }
          }
        }
        // pass 2: probabilities (unnormalised) and their sums
        for (int64_t g = 0; g < group; ++g) {
          float* sg = scores.data() + g * ctx;
          const float m = mx[g];
          float z = 0.0f;
#pragma omp simd reduction(+ : z)
          for (int64_t i = 0; i < ctx; ++i) {
            const float p = exp_nonpositive(sg[i] - m);
            sg[i] = p;
            z += p;
          }
          sum[g] = z;
        }
        // pass 3: the weighted sum of V rows
#ifdef PDSERVE_AVX512_BF16
        if (kFastBf16 && fast_v) {
          if constexpr (kFastBf16)
            avx512::weighted_values<HD>(group, acc.data(), scores.data(), ctx, vp, table, block_size, row, h);
        } else
#endif
        {
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t b = 0, pos = 0; pos < ctx; ++b) {
          const int64_t base = static_cast<int64_t>(table[b]) * block_size;
          const int64_t len = std::min(block_size, ctx - pos);
          for (int64_t o = 0; o < len; ++o, ++pos) {
            const T* vr = vp + (base + o) * row + h * hd;
            for (int64_t g = 0; g < group; ++g) axpy<HD>(acc.data() + g * hd, scores[g * ctx + pos], vr, hd);
          }
        }
        }
        for (int64_t g = 0; g < group; ++g) {
          T* orow = op + s * o_s0 + (h * group + g) * o_s1;
          const float inv = 1.0f / sum[g];
          for (int64_t i = 0; i < hd; ++i) orow[i] = static_cast<T>(acc[g * hd + i] * inv);
        }
      }
    }
  });
}

template <typename T>
void dispatch_head_dim(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t block_size,
                       double scale) {
  switch (q.size(2)) {
    case 64:
      return decode_attention<T, 64>(out, q, k_cache, v_cache, block_tables, context_lens, block_size, scale);
    case 128:
      return decode_attention<T, 128>(out, q, k_cache, v_cache, block_tables, context_lens, block_size, scale);
    default:
      return decode_attention<T, 0>(out, q, k_cache, v_cache, block_tables, context_lens, block_size, scale);
  }
}

void paged_decode_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables,
                            const at::Tensor& context_lens, int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 3 && out.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3,
              "q, out: [n, heads, head_dim]; caches: [slots, kv_heads, head_dim]");
  TORCH_CHECK(q.device().is_cpu() && out.device().is_cpu() && k_cache.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type() &&
                  q.scalar_type() == out.scalar_type(),
              "q, out and the caches must share a dtype");
  TORCH_CHECK(out.sizes() == q.sizes(), "out must have q's shape");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "the caches must be contiguous and of one shape");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1, "q and out need a contiguous last dimension");
  TORCH_CHECK(k_cache.size(2) == q.size(2), "head_dim differs between q and the cache");
  TORCH_CHECK(q.size(1) % k_cache.size(1) == 0, "heads must be a multiple of kv heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt &&
                  block_tables.is_contiguous() && context_lens.is_contiguous(),
              "block_tables and context_lens: contiguous int32");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == q.size(0) && context_lens.numel() == q.size(0),
              "block_tables [n, max_blocks] and context_lens [n]");
  TORCH_CHECK(block_size >= 1, "block_size must be positive");
  if (q.size(0) == 0) return;
  switch (q.scalar_type()) {
    case at::kFloat:
      dispatch_head_dim<float>(out, q, k_cache, v_cache, block_tables, context_lens, block_size, scale);
      break;
    case at::kBFloat16:
      dispatch_head_dim<c10::BFloat16>(out, q, k_cache, v_cache, block_tables, context_lens, block_size, scale);
      break;
    default:
      TORCH_CHECK(false, "paged_decode_attention: float32 or bfloat16, not ", q.scalar_type());
  }
}


// ---------------------------------------------------------------------------------------------------
// Paged prefill attention (bf16, AVX-512-BF16): the queries of each prefill chunk attend, causally, to
// their sequence's keys where they lie in the paged cache: the earlier context (cached prefix, earlier
// chunks) and the chunk's own KV, which the forward pass has written there before calling. No gather,
// no mask tensor, one call for every prefill of the step.
//
// One work item is (sequence, kv head, tile of up to 64 query rows): the tile packs each 64-key chunk of
// K and V once for all its rows, and the group's query heads of a row go through together (up to four),
// sharing every load. Keys are taken 64 at a time, flash-attention style (online softmax, fp32 max and
// sum): K is transposed into bf16 pairs, so a query's sixteen scores are 32 VDPBF16PS with the query's
// pairs broadcast, no horizontal sums; the probabilities are rounded to bf16 (as HF's bf16 attention
// rounds its softmax before multiplying V) and multiplied with V interleaved in key pairs.

#ifdef PDSERVE_AVX512_BF16
namespace avx512 {

// exp(x) for x <= 0, sixteen lanes: `exp_nonpositive`'s range reduction and polynomial.
inline __m512 exp_nonpositive16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f),
                                   _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

constexpr int64_t kTileRows = 64;  // query rows per work item: K and V chunks are packed once for them all
constexpr int64_t kKeys = 64;      // keys per inner step (a multiple of 16)

struct PrefillScratch {
  std::vector<uint32_t> kt, vt;  // K chunk as [HD / 2][16] pairs of dims; V chunk as [8][HD] pairs of keys
  std::vector<float> o, m, l;    // per query vector: output accumulator [HD], running max, running sum
};

// One 64-key step of the online softmax for N query vectors of one row (`seen` keys visible): q.k on VDPBF16PS
// against the K chunk's dim pairs, the running max and sum, then p.V against the V chunk's key pairs, into
// the vectors' accumulators `w.o[qi..qi+N)`.
template <int64_t HD, int N>
inline void prefill_step(const uint32_t* const* qq, int64_t qi, int64_t seen, const uint32_t* kt, const uint32_t* vt,
                         __m512 vscale, PrefillScratch& w) {
  constexpr int64_t D2 = HD / 2, V = kKeys / 16, C = HD / 16;
  const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
  const int64_t nv = (seen + 15) / 16;
  __m512 sv[N][V];
  for (int i = 0; i < N; ++i)
    for (int64_t v = 0; v < V; ++v) sv[i][v] = _mm512_setzero_ps();
  for (int64_t d2 = 0; d2 < D2; ++d2) {
    __m512bh qb[N];
    for (int i = 0; i < N; ++i) qb[i] = (__m512bh)_mm512_set1_epi32(static_cast<int>(qq[i][d2]));
    for (int64_t v = 0; v < nv; ++v) {
      const __m512bh k = (__m512bh)_mm512_loadu_si512(kt + d2 * kKeys + 16 * v);
      for (int i = 0; i < N; ++i) sv[i][v] = _mm512_dpbf16_ps(sv[i][v], qb[i], k);
    }
  }
  alignas(64) uint32_t pp[N][kKeys / 2];
  float alpha[N];
  for (int i = 0; i < N; ++i) {
    __m512 vmax = neg_inf;
    for (int64_t v = 0; v < nv; ++v) {
      const int64_t left = seen - 16 * v;
      const __mmask16 valid = static_cast<__mmask16>(left >= 16 ? 0xFFFFu : (1u << left) - 1u);
      sv[i][v] = _mm512_mask_blend_ps(valid, neg_inf, _mm512_mul_ps(sv[i][v], vscale));
      vmax = _mm512_max_ps(vmax, sv[i][v]);
    }
    const float m_old = w.m[qi + i];
    const float m_new = std::max(m_old, _mm512_reduce_max_ps(vmax));
    const __m512 vm = _mm512_set1_ps(m_new);
    __m512 psum = _mm512_setzero_ps();
    for (int64_t v = 0; v < nv; ++v) {
      // masked lanes hold -inf: exp clamps them to ~1e-38, zeroed here
      const __m512 p = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(sv[i][v], neg_inf, _CMP_NEQ_OQ),
                                           exp_nonpositive16(_mm512_sub_ps(sv[i][v], vm)));
      psum = _mm512_add_ps(psum, p);
      _mm256_store_si256(reinterpret_cast<__m256i*>(pp[i] + 8 * v), (__m256i)_mm512_cvtneps_pbh(p));
    }
    alpha[i] = m_old == m_new ? 1.0f : std::exp(m_old - m_new);
    w.l[qi + i] = w.l[qi + i] * alpha[i] + _mm512_reduce_add_ps(psum);
    w.m[qi + i] = m_new;
  }
  __m512 acc[N][C];  // the vectors' HD outputs in registers: N * HD / 16 independent chains
  for (int i = 0; i < N; ++i) {
    const __m512 va = _mm512_set1_ps(alpha[i]);
    const float* o = w.o.data() + (qi + i) * HD;
    for (int64_t c = 0; c < C; ++c) acc[i][c] = _mm512_mul_ps(_mm512_loadu_ps(o + 16 * c), va);
  }
  const int64_t seen_pairs = (seen + 1) / 2;  // an odd last key pairs with a zero probability
  for (int64_t j2 = 0; j2 < seen_pairs; ++j2) {
    __m512bh pj[N];
    for (int i = 0; i < N; ++i) pj[i] = (__m512bh)_mm512_set1_epi32(static_cast<int>(pp[i][j2]));
    for (int64_t c = 0; c < C; ++c) {
      const __m512bh vv = (__m512bh)_mm512_loadu_si512(vt + j2 * HD + 16 * c);
      for (int i = 0; i < N; ++i) acc[i][c] = _mm512_dpbf16_ps(acc[i][c], pj[i], vv);
    }
  }
  for (int i = 0; i < N; ++i)
    for (int64_t c = 0; c < C; ++c) _mm512_storeu_ps(w.o.data() + (qi + i) * HD + 16 * c, acc[i][c]);
}

template <int64_t HD>
void prefill_tile(bf16* op, int64_t o_s0, int64_t o_s1, const bf16* qp, int64_t q_s0, int64_t q_s1,
                  const bf16* kp, const bf16* vp, const int32_t* table, int64_t block_size, int64_t row, int64_t h,
                  int64_t group, int64_t r0, int64_t nr, int64_t pos0, float scale, PrefillScratch& w) {
  constexpr int64_t D2 = HD / 2;  // dim pairs
  const int64_t nq = nr * group;  // query vectors: qi = r * group + g
  std::fill(w.o.begin(), w.o.begin() + nq * HD, 0.0f);
  std::fill(w.m.begin(), w.m.begin() + nq, -INFINITY);
  std::fill(w.l.begin(), w.l.begin() + nq, 0.0f);
  uint32_t* kt = w.kt.data();
  uint32_t* vt = w.vt.data();
  const int64_t last = pos0 + nr - 1;  // the last key any row of the tile sees
  const __m512 vscale = _mm512_set1_ps(scale);
  const uint32_t* krow[kKeys];
  const uint16_t* vrow[kKeys];
  for (int64_t kb = 0; kb <= last; kb += kKeys) {
    const int64_t len = std::min(kKeys, last + 1 - kb);
    for (int64_t j = 0; j < len; ++j) {
      const int64_t key = kb + j;
      const int64_t slot = static_cast<int64_t>(table[key / block_size]) * block_size + key % block_size;
      krow[j] = reinterpret_cast<const uint32_t*>(kp + slot * row + h * HD);
      vrow[j] = reinterpret_cast<const uint16_t*>(vp + slot * row + h * HD);
    }
    // K as [D2][kKeys] dim pairs, V as [kKeys / 2][HD] key pairs; zeros past `len`
    for (int64_t j = 0; j < len; ++j)
      for (int64_t d2 = 0; d2 < D2; ++d2) kt[d2 * kKeys + j] = krow[j][d2];
    for (int64_t j = len; j < kKeys; ++j)
      for (int64_t d2 = 0; d2 < D2; ++d2) kt[d2 * kKeys + j] = 0u;
    const int64_t pairs = (len + 1) / 2;
    for (int64_t j2 = 0; j2 < pairs; ++j2) {
      const uint16_t* x = vrow[2 * j2];
      uint32_t* t = vt + j2 * HD;
      if (2 * j2 + 1 < len) {
        const uint16_t* y = vrow[2 * j2 + 1];
        for (int64_t d = 0; d < HD; ++d) t[d] = x[d] | static_cast<uint32_t>(y[d]) << 16;
      } else {
        for (int64_t d = 0; d < HD; ++d) t[d] = x[d];
      }
    }
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t pos = pos0 + r;  // this row sees keys 0..pos
      if (kb > pos) continue;
      const int64_t seen = std::min(len, pos - kb + 1);  // keys of this step the row sees
      // the row's query vectors (one per head of the GQA group) go through together, up to four at once: they
      // share every K and V load, and their sums are independent chains for VDPBF16PS's latency
      for (int64_t g = 0; g < group; g += 4) {
        const int64_t n = std::min<int64_t>(4, group - g);
        const uint32_t* qq[4];
        for (int64_t i = 0; i < n; ++i)
          qq[i] = reinterpret_cast<const uint32_t*>(qp + (r0 + r) * q_s0 + (h * group + g + i) * q_s1);
        const int64_t qi = r * group + g;
        switch (n) {
          case 1: prefill_step<HD, 1>(qq, qi, seen, kt, vt, vscale, w); break;
          case 2: prefill_step<HD, 2>(qq, qi, seen, kt, vt, vscale, w); break;
          case 3: prefill_step<HD, 3>(qq, qi, seen, kt, vt, vscale, w); break;
          default: prefill_step<HD, 4>(qq, qi, seen, kt, vt, vscale, w); break;
        }
      }
    }
  }
  for (int64_t qi = 0; qi < nq; ++qi) {
    const int64_t r = qi / group, g = qi % group;
    bf16* orow = op + (r0 + r) * o_s0 + (h * group + g) * o_s1;
    const float inv = 1.0f / w.l[qi];
    const float* o = w.o.data() + qi * HD;
    for (int64_t i = 0; i < HD; ++i) orow[i] = static_cast<bf16>(o[i] * inv);
  }
}

template <int64_t HD>
void prefill_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& block_tables, const at::Tensor& query_starts, const at::Tensor& context_lens,
                       int64_t block_size, double scale) {
  const int64_t seqs = context_lens.numel(), nh = q.size(1), kvh = k_cache.size(1), group = nh / kvh;
  const int64_t max_blocks = block_tables.size(1), num_slots = k_cache.size(0), row = kvh * HD;
  const int32_t* tables = block_tables.const_data_ptr<int32_t>();
  const int32_t* starts = query_starts.const_data_ptr<int32_t>();
  const int32_t* lens = context_lens.const_data_ptr<int32_t>();
  TORCH_CHECK(starts[0] == 0 && starts[seqs] == q.size(0), "query_starts must run from 0 to the number of rows");
  struct Item { int64_t s, h, r0, nr; };
  std::vector<Item> items;
  for (int64_t s = 0; s < seqs; ++s) {
    const int64_t qn = starts[s + 1] - starts[s], ctx = lens[s];
    TORCH_CHECK(qn >= 1 && qn <= ctx && ctx <= max_blocks * block_size, "sequence ", s, ": ", qn,
                " query rows and a context of ", ctx, " (at most ", max_blocks * block_size, ")");
    for (int64_t b = 0; b * block_size < ctx; ++b) {
      const int64_t blk = tables[s * max_blocks + b];
      TORCH_CHECK(blk >= 0 && (blk + 1) * block_size <= num_slots, "block ", blk, " of sequence ", s,
                  " is outside the cache");
    }
    for (int64_t t = 0; t < qn; t += kTileRows)
      for (int64_t h = 0; h < kvh; ++h) items.push_back({s, h, t, std::min(kTileRows, qn - t)});
  }
  // most keys first: items are taken from a shared counter, so the last to start are the cheap ones
  auto end_pos = [&](const Item& it) { return lens[it.s] - (starts[it.s + 1] - starts[it.s]) + it.r0 + it.nr; };
  std::stable_sort(items.begin(), items.end(), [&](const Item& a, const Item& b) { return end_pos(a) > end_pos(b); });
  std::atomic<int64_t> next{0};
  const auto* qp = reinterpret_cast<const bf16*>(q.const_data_ptr());
  const auto* kp = reinterpret_cast<const bf16*>(k_cache.const_data_ptr());
  const auto* vp = reinterpret_cast<const bf16*>(v_cache.const_data_ptr());
  auto* op = reinterpret_cast<bf16*>(out.mutable_data_ptr());
  const int64_t n_items = static_cast<int64_t>(items.size());
  const float sc = static_cast<float>(scale);
  auto work = [&](int64_t, int64_t) {
    PrefillScratch w;
    w.kt.resize(HD / 2 * kKeys);
    w.vt.resize(kKeys / 2 * HD);
    w.o.resize(kTileRows * group * HD);
    w.m.resize(kTileRows * group);
    w.l.resize(kTileRows * group);
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n_items;) {
      const Item& it = items[i];
      const int64_t qn = starts[it.s + 1] - starts[it.s];
      prefill_tile<HD>(op, out.stride(0), out.stride(1), qp, q.stride(0), q.stride(1), kp, vp,
                       tables + it.s * max_blocks, block_size, row, it.h, group, starts[it.s] + it.r0, it.nr,
                       lens[it.s] - qn + it.r0, sc, w);
    }
  };
  if (n_items <= 1) work(0, 1);
  else at::parallel_for(0, at::get_num_threads(), 1, work);
}

}  // namespace avx512
#endif

// Whether `paged_prefill_attention` runs here: compiled for AVX-512-BF16; bf16, head_dim 16, 32, 64 or
// 128. Elsewhere the engine keeps its torch prefill path.
bool paged_prefill_attention_supported(at::ScalarType dtype, int64_t head_dim, int64_t group) {
#ifdef PDSERVE_AVX512_BF16
  return dtype == at::kBFloat16 && (head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128) &&
         group >= 1;
#else
  (void)dtype, (void)head_dim, (void)group;
  return false;
#endif
}

void paged_prefill_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& block_tables,
                             const at::Tensor& query_starts, const at::Tensor& context_lens, int64_t block_size,
                             double scale) {
  TORCH_CHECK(q.dim() == 3 && out.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3,
              "q, out: [n, heads, head_dim]; caches: [slots, kv_heads, head_dim]");
  TORCH_CHECK(q.device().is_cpu() && out.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "CPU tensors only");
  TORCH_CHECK(out.sizes() == q.sizes(), "out must have q's shape");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "the caches must be contiguous and of one shape");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1, "q and out need a contiguous last dimension");
  TORCH_CHECK(k_cache.size(2) == q.size(2) && q.size(1) % k_cache.size(1) == 0,
              "q's heads must be a multiple of the cache's kv heads, with the same head_dim");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type() &&
                  q.scalar_type() == out.scalar_type(),
              "q, out and the caches must share a dtype");
  TORCH_CHECK(paged_prefill_attention_supported(q.scalar_type(), q.size(2), q.size(1) / k_cache.size(1)),
              "paged_prefill_attention does not run ", q.scalar_type(), " with head_dim ", q.size(2),
              " on this build (it needs AVX-512-BF16 and bfloat16)");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && query_starts.scalar_type() == at::kInt &&
                  context_lens.scalar_type() == at::kInt && block_tables.is_contiguous() &&
                  query_starts.is_contiguous() && context_lens.is_contiguous(),
              "block_tables, query_starts and context_lens: contiguous int32");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == context_lens.numel() &&
                  query_starts.numel() == context_lens.numel() + 1,
              "block_tables [seqs, max_blocks], query_starts [seqs + 1], context_lens [seqs]");
  TORCH_CHECK(block_size >= 1, "block_size must be positive");
  if (q.size(0) == 0) return;
#ifdef PDSERVE_AVX512_BF16
  auto run = [&](auto hd) {
    avx512::prefill_attention<decltype(hd)::value>(out, q, k_cache, v_cache, block_tables, query_starts,
                                                   context_lens, block_size, scale);
  };
  switch (q.size(2)) {
    case 16: return run(std::integral_constant<int64_t, 16>{});
    case 32: return run(std::integral_constant<int64_t, 32>{});
    case 64: return run(std::integral_constant<int64_t, 64>{});
    default: return run(std::integral_constant<int64_t, 128>{});
  }
#endif
}

}  // namespace


// ---------------------------------------------------------------------------------------------------
// Fused elementwise ops for the bf16 model (`engine.model`, `FusedOps`): each replaces a chain of small
// torch ops (eight for an RMSNorm, five for RoPE, two KV-cache writes, SiLU and its product) with one
// pass over the rows, rounding to bf16 exactly where HF's bf16 modules round, so the results match
// the torch chain's up to the order of one fp32 sum. Small inputs (a decode step's rows) run on the
// calling thread: an op of a few microseconds does not pay for waking the pool, nor wait at its
// barrier for a thread the OS has lent to another process.

namespace {

using bf16_t = c10::BFloat16;

inline float bf2f(uint16_t b) { return __builtin_bit_cast(float, static_cast<uint32_t>(b) << 16); }

// fp32 -> bf16, round to nearest even (as c10::BFloat16), NaN kept a NaN; branch-free, so it vectorises.
inline uint16_t f2bf(float f) {
  const uint32_t u = __builtin_bit_cast(uint32_t, f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? static_cast<uint16_t>(0x7FC0u) : static_cast<uint16_t>(rounded);
}

// bf16 rounding of an fp32 value, kept in fp32 (the value a bf16 tensor op would store).
inline float round_bf(float f) { return bf2f(f2bf(f)); }

// Rows at most this many elements in all run on the calling thread.
constexpr int64_t kSerialElements = 1 << 16;

template <typename F>
void for_rows(int64_t rows, int64_t row_elements, const F& f) {
  const int64_t grain = std::max<int64_t>(1, kSerialElements / std::max<int64_t>(1, row_elements));
  if (rows <= grain) {
    f(0, rows);
    return;
  }
  at::parallel_for(0, rows, grain, f);
}

inline const uint16_t* bits(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.const_data_ptr()); }
inline uint16_t* mbits(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.mutable_data_ptr()); }

void check_bf16_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.device().is_cpu(), name, ": a bfloat16 CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, ": [rows, width] with a contiguous last dimension");
}

// out = weight * bf16(x * rsqrt(mean(x^2) + eps)) (HF LlamaRMSNorm in bf16); with `add`, first x = bf16(x + delta).
void rms_norm_rows(at::Tensor& x, const at::Tensor* delta, const at::Tensor& weight, at::Tensor& out, double eps) {
  check_bf16_rows(x, "x");
  check_bf16_rows(out, "out");
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.is_contiguous() && weight.dim() == 1, "weight: bf16 [width]");
  const int64_t n = x.size(0), w = x.size(1);
  TORCH_CHECK(weight.size(0) == w && out.size(0) == n && out.size(1) == w, "shapes differ");
  if (delta != nullptr) {
    check_bf16_rows(*delta, "delta");
    TORCH_CHECK(delta->size(0) == n && delta->size(1) == w, "delta: x's shape");
  }
  uint16_t* xp = mbits(x);
  const uint16_t* dp = delta != nullptr ? bits(*delta) : nullptr;
  const uint16_t* wp = bits(weight);
  uint16_t* op = mbits(out);
  const int64_t xs = x.stride(0), os = out.stride(0), ds = delta != nullptr ? delta->stride(0) : 0;
  const float e = static_cast<float>(eps);
  for_rows(n, w, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      uint16_t* xr = xp + r * xs;
      if (dp != nullptr) {
        const uint16_t* dr = dp + r * ds;
#pragma omp simd
        for (int64_t i = 0; i < w; ++i) xr[i] = f2bf(bf2f(xr[i]) + bf2f(dr[i]));
      }
      float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < w; ++i) ss += bf2f(xr[i]) * bf2f(xr[i]);
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(w) + e);
      uint16_t* orow = op + r * os;
#pragma omp simd
      for (int64_t i = 0; i < w; ++i) orow[i] = f2bf(bf2f(wp[i]) * round_bf(bf2f(xr[i]) * inv));
    }
  });
}

void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor xm = x;  // read only: no delta
  rms_norm_rows(xm, nullptr, weight, out, eps);
}

void add_rms_norm(at::Tensor x, const at::Tensor& delta, const at::Tensor& weight, at::Tensor out, double eps) {
  rms_norm_rows(x, &delta, weight, out, eps);
}

// In place on qkv [n, (heads + 2 kv_heads) * head_dim]: RoPE on the q and k heads (HF's
// q*cos + rotate_half(q)*sin, each product and the sum rounded to bf16), then each token's k and v heads
// written to its slot of the paged caches [slots, kv_heads, head_dim].
void rope_kv_cache(at::Tensor qkv, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                   int64_t num_heads, int64_t num_kv_heads, at::Tensor k_cache, at::Tensor v_cache,
                   const at::Tensor& slot_mapping) {
  check_bf16_rows(qkv, "qkv");
  TORCH_CHECK(cos.scalar_type() == at::kBFloat16 && sin.scalar_type() == at::kBFloat16 && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.dim() == 2 && cos.sizes() == sin.sizes(),
              "cos, sin: bf16 [max_positions, head_dim]");
  TORCH_CHECK(k_cache.scalar_type() == at::kBFloat16 && v_cache.scalar_type() == at::kBFloat16 &&
                  k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 3 &&
                  k_cache.sizes() == v_cache.sizes(),
              "caches: bf16 [slots, kv_heads, head_dim], contiguous");
  TORCH_CHECK(positions.scalar_type() == at::kLong && slot_mapping.scalar_type() == at::kLong &&
                  positions.is_contiguous() && slot_mapping.is_contiguous(),
              "positions, slot_mapping: contiguous int64");
  const int64_t n = qkv.size(0), hd = cos.size(1), half = hd / 2;
  const int64_t rope_heads = num_heads + num_kv_heads;
  TORCH_CHECK(hd % 2 == 0 && hd <= 1024 && qkv.size(1) == (num_heads + 2 * num_kv_heads) * hd,
              "qkv width (head_dim even, at most 1024)");
  TORCH_CHECK(k_cache.size(1) == num_kv_heads && k_cache.size(2) == hd, "cache heads");
  TORCH_CHECK(positions.numel() == n && slot_mapping.numel() == n, "one position and slot per token");
  const int64_t max_pos = cos.size(0), num_slots = k_cache.size(0), row = num_kv_heads * hd;
  const int64_t* pos = positions.const_data_ptr<int64_t>();
  const int64_t* slots = slot_mapping.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < n; ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < max_pos, "position ", pos[t], " outside the RoPE table");
    TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, "slot ", slots[t], " outside the cache");
  }
  uint16_t* qp = mbits(qkv);
  const uint16_t* cp = bits(cos);
  const uint16_t* sp = bits(sin);
  uint16_t* kc = mbits(k_cache);
  uint16_t* vc = mbits(v_cache);
  const int64_t qs = qkv.stride(0);
  for_rows(n, qkv.size(1), [&](int64_t r0, int64_t r1) {
    for (int64_t t = r0; t < r1; ++t) {
      uint16_t* base = qp + t * qs;
      const uint16_t* c = cp + pos[t] * hd;
      const uint16_t* s = sp + pos[t] * hd;
      for (int64_t h = 0; h < rope_heads; ++h) {
        uint16_t* x = base + h * hd;
        float lo[512], hi[512];
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float a = bf2f(x[i]), b = bf2f(x[i + half]);
          lo[i] = round_bf(round_bf(a * bf2f(c[i])) + round_bf(-b * bf2f(s[i])));
          hi[i] = round_bf(round_bf(b * bf2f(c[i + half])) + round_bf(a * bf2f(s[i + half])));
        }
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          x[i] = f2bf(lo[i]);
          x[i + half] = f2bf(hi[i]);
        }
      }
      std::memcpy(kc + slots[t] * row, base + num_heads * hd, row * sizeof(uint16_t));
      std::memcpy(vc + slots[t] * row, base + rope_heads * hd, row * sizeof(uint16_t));
    }
  });
}

// out [n, I] = bf16(bf16(silu(gate)) * up), gate_up [n, 2 I] = [gate | up] (HF's act_fn(gate) * up in bf16).
void silu_mul(at::Tensor out, const at::Tensor& gate_up) {
  check_bf16_rows(gate_up, "gate_up");
  check_bf16_rows(out, "out");
  const int64_t n = gate_up.size(0), inter = gate_up.size(1) / 2;
  TORCH_CHECK(gate_up.size(1) == 2 * inter && out.size(0) == n && out.size(1) == inter, "shapes");
  const uint16_t* gp = bits(gate_up);
  uint16_t* op = mbits(out);
  const int64_t gs = gate_up.stride(0), os = out.stride(0);
  for_rows(n, 2 * inter, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint16_t* g = gp + r * gs;
      const uint16_t* u = g + inter;
      uint16_t* o = op + r * os;
#pragma omp simd
      for (int64_t i = 0; i < inter; ++i) {
        const float x = bf2f(g[i]);
        const float e = exp_nonpositive(-std::fabs(x));  // exp(-|x|): no overflow either side
        const float sig = x >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
        o[i] = f2bf(round_bf(x * sig) * bf2f(u[i]));
      }
    }
  });
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// The bf16 linear of the CPU model (`engine.model.Linear`'s tiled layout): out[M, N] = x[M, K] W^T (+ bias),
// W tiled as [ceil(N/32), ceil(K/2), 32, 2] (`engine.model.tile_bf16_weight`): for each block of 32 outputs,
// the pairs (W[o][2p], W[o][2p+1]) of all 32 outputs side by side, one 64-byte line per pair index p. One
// VDPBF16PS then multiplies a pair of x, broadcast, into 16 outputs' fp32 sums at once, with no horizontal
// sum, and a block's weights stream from memory once for up to 8 rows of x. Decode (a few rows) is bound by
// the weight stream: measured on SmolLM2's projections, 2 threads, batch 1 ~1.25x faster than oneDNN's packed
// bf16 GEMM, and no slower from 2 to 512 rows. Rows beyond 8 are taken in panels that stay in L2 while the
// thread walks its blocks. Sums are fp32; the result is rounded to bf16 once (round to nearest even), with the
// bias (fp32) added first, as oneDNN's bf16 linear does.

namespace {

constexpr int64_t kLinearBlock = 32;  // outputs per tile: two 16-lane fp32 accumulators
constexpr int64_t kLinearRows = 8;    // rows of x per tile (16 accumulators)

bool bf16_linear_supported() {
#ifdef PDSERVE_AVX512_BF16
  return true;
#else
  return false;
#endif
}

#ifdef PDSERVE_AVX512_BF16
// R rows of x (row stride ldx, K elements) times one tiled block of 32 outputs (`valid` of them real).
template <int R>
inline void linear_tile(uint16_t* out, int64_t ldo, const uint16_t* x, int64_t ldx, int64_t K, const uint16_t* wb,
                        const float* bias, int64_t valid) {
  __m512 a0[R], a1[R];
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
  const int64_t pairs = K / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wb + p * 2 * kLinearBlock);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wb + p * 2 * kLinearBlock + kLinearBlock);
    for (int r = 0; r < R; ++r) {
      int32_t xp;
      std::memcpy(&xp, x + r * ldx + 2 * p, sizeof xp);
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(xp);
      a0[r] = _mm512_dpbf16_ps(a0[r], xb, w0);
      a1[r] = _mm512_dpbf16_ps(a1[r], xb, w1);
    }
  }
  if (K & 1) {  // the last pair is (x[K-1], 0); the tiled weight's padding is zero too
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wb + pairs * 2 * kLinearBlock);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wb + pairs * 2 * kLinearBlock + kLinearBlock);
    for (int r = 0; r < R; ++r) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(x[r * ldx + K - 1]));
      a0[r] = _mm512_dpbf16_ps(a0[r], xb, w0);
      a1[r] = _mm512_dpbf16_ps(a1[r], xb, w1);
    }
  }
  const __mmask16 m0 = valid >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << valid) - 1);
  const __mmask16 m1 = valid >= 32 ? 0xFFFF : valid <= 16 ? 0 : static_cast<__mmask16>((1u << (valid - 16)) - 1);
  __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
  if (bias != nullptr) {
    b0 = _mm512_maskz_loadu_ps(m0, bias);
    b1 = _mm512_maskz_loadu_ps(m1, bias + 16);
  }
  for (int r = 0; r < R; ++r) {
    _mm256_mask_storeu_epi16(out + r * ldo, m0, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(a0[r], b0)));
    _mm256_mask_storeu_epi16(out + r * ldo + 16, m1, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(a1[r], b1)));
  }
}

template <int... Rs>
inline void linear_rows(int64_t rows, uint16_t* out, int64_t ldo, const uint16_t* x, int64_t ldx, int64_t K,
                        const uint16_t* wb, const float* bias, int64_t valid, std::integer_sequence<int, Rs...>) {
  ((rows == Rs + 1 ? linear_tile<Rs + 1>(out, ldo, x, ldx, K, wb, bias, valid) : void()), ...);
}
#endif

void bf16_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& tiled, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(bf16_linear_supported(), "bf16_linear needs a build for AVX-512-BF16");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kBFloat16 &&
                  tiled.scalar_type() == at::kBFloat16,
              "bf16_linear: x, out and the tiled weight must be bfloat16");
  TORCH_CHECK(x.device().is_cpu() && out.device().is_cpu() && tiled.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && x.stride(1) == 1 && out.stride(1) == 1,
              "x [M, K] and out [M, N] with a contiguous last dimension");
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1);
  TORCH_CHECK(out.size(0) == M, "out must have x's rows");
  TORCH_CHECK(tiled.dim() == 4 && tiled.is_contiguous() && tiled.size(0) == (N + kLinearBlock - 1) / kLinearBlock &&
                  tiled.size(1) == (K + 1) / 2 && tiled.size(2) == kLinearBlock && tiled.size(3) == 2,
              "the tiled weight must be [ceil(N/32), ceil(K/2), 32, 2] for out's N and x's K (tile_bf16_weight)");
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
                "bias: float32, contiguous, N elements");
    bp = bias->const_data_ptr<float>();
  }
  if (M == 0 || N == 0) return;
#ifdef PDSERVE_AVX512_BF16
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.const_data_ptr());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(tiled.const_data_ptr());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.mutable_data_ptr());
  const int64_t ldx = x.stride(0), ldo = out.stride(0), nb = tiled.size(0), block_elems = tiled.size(1) * 2 * kLinearBlock;
  // rows of x per panel: ~256 KB of x, so that a panel stays in L2 while a thread walks its blocks
  const int64_t panel = std::max<int64_t>(kLinearRows, (int64_t{1} << 17) / std::max<int64_t>(1, K) / kLinearRows * kLinearRows);
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t m0 = 0; m0 < M; m0 += panel) {
      const int64_t m1 = std::min(M, m0 + panel);
      for (int64_t b = b0; b < b1; ++b) {
        const uint16_t* wb = wp + b * block_elems;
        const int64_t valid = std::min<int64_t>(kLinearBlock, N - b * kLinearBlock);
        const float* bb = bp == nullptr ? nullptr : bp + b * kLinearBlock;
        for (int64_t m = m0; m < m1; m += kLinearRows) {
          linear_rows(std::min<int64_t>(kLinearRows, m1 - m), op + m * ldo + b * kLinearBlock, ldo, xp + m * ldx, ldx,
                      K, wb, bb, valid, std::make_integer_sequence<int, kLinearRows>{});
        }
      }
    }
  });
#endif
}

}  // namespace

TORCH_LIBRARY(pdserve, m) {
  m.def("paged_decode_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, int block_size, float scale) -> ()",
        &paged_decode_attention);
  m.def("paged_prefill_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor query_starts, Tensor context_lens, int block_size, float scale) -> ()",
        &paged_prefill_attention);
  m.def("paged_prefill_attention_supported(ScalarType dtype, int head_dim, int group) -> bool",
        &paged_prefill_attention_supported);
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()", &rms_norm);
  m.def("add_rms_norm(Tensor(a!) x, Tensor delta, Tensor weight, Tensor(b!) out, float eps) -> ()", &add_rms_norm);
  m.def("rope_kv_cache(Tensor(a!) qkv, Tensor positions, Tensor cos, Tensor sin, int num_heads, int num_kv_heads, "
        "Tensor(b!) k_cache, Tensor(c!) v_cache, Tensor slot_mapping) -> ()", &rope_kv_cache);
  m.def("silu_mul(Tensor(a!) out, Tensor gate_up) -> ()", &silu_mul);
  m.def("bf16_linear(Tensor(a!) out, Tensor x, Tensor tiled, Tensor? bias) -> ()", &bf16_linear);
  m.def("bf16_linear_supported() -> bool", &bf16_linear_supported);
}
