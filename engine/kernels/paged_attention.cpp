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

TORCH_LIBRARY(pdserve, m) {
  m.def("paged_decode_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, int block_size, float scale) -> ()",
        &paged_decode_attention);
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()", &rms_norm);
  m.def("add_rms_norm(Tensor(a!) x, Tensor delta, Tensor weight, Tensor(b!) out, float eps) -> ()", &add_rms_norm);
  m.def("rope_kv_cache(Tensor(a!) qkv, Tensor positions, Tensor cos, Tensor sin, int num_heads, int num_kv_heads, "
        "Tensor(b!) k_cache, Tensor(c!) v_cache, Tensor slot_mapping) -> ()", &rope_kv_cache);
  m.def("silu_mul(Tensor(a!) out, Tensor gate_up) -> ()", &silu_mul);
}
