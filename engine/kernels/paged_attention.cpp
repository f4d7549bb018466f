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
#include <vector>

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
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t b = 0, pos = 0; pos < ctx; ++b) {
          const int64_t base = static_cast<int64_t>(table[b]) * block_size;
          const int64_t len = std::min(block_size, ctx - pos);
          for (int64_t o = 0; o < len; ++o, ++pos) {
            const T* vr = vp + (base + o) * row + h * hd;
            for (int64_t g = 0; g < group; ++g) axpy<HD>(acc.data() + g * hd, scores[g * ctx + pos], vr, hd);
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

}  // namespace

TORCH_LIBRARY(pdserve, m) {
  m.def("paged_decode_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, int block_size, float scale) -> ()",
        &paged_decode_attention);
}
