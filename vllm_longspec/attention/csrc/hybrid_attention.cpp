// Hybrid attention on CPU, reading vLLM's CPU KV cache ("vec"/"vec16"/"amx"
// packing) in place.
//
// The query tokens of request r attend
//   (1) the cached prefix: positions [0, prefix_lens[r]) of its block table,
//       no mask, and, when new-token keys/values are given,
//   (2) the request's new (speculative) tokens under a mask: new token j is
//       visible to new token i when j <= i (a chain, no ancestor_bits) or when
//       bit j of ancestor_bits[i] is set (a tree).
// Both parts enter one online softmax, so the result is exactly the softmax
// over prefix + visible new tokens; without (2) it is the prefix attention and
// its log-sum-exp.
//
// Keys and values of the cache arrive as logical views [num_blocks,
// num_kv_heads, block_size, head_size] whose strides say where each element
// lives: vLLM's "vec" packing stores a key page transposed (token stride 1,
// dim stride block_size) and a value page as rows (dim stride 1), which is
// what the two inner products below want. With amx_packing the pages hold
// vLLM's amx tiles and are decoded while widening.
//
// Work item: (request, kv head, split of the prefix blocks). Its rows are the
// request's query tokens times the query heads sharing that kv head. Per block
// of keys: S = Q K^T (register-blocked), masked online softmax, ACC += P V. The
// new tokens are one more block, attended by the request's last split. Splits
// merge by log-sum-exp at the end (FlashDecoding). Softmax and accumulation in
// float32. bfloat16 on CPUs with AVX512_BF16: Q.K^T and P.V take bf16 pairs
// (vdpbf16ps: two products per float32 lane, exact products, float32 sums; P
// rounded to bf16), the pages repacked into pairs once per block. Otherwise
// 16-bit pages are widened to float32 once per block.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#define LONGSPEC_BF16_PAIRS 1
#else
#define LONGSPEC_BF16_PAIRS 0
#endif

namespace {

typedef float vec16 __attribute__((vector_size(64)));
typedef int32_t ivec16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
constexpr int LANES = 16;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
// Without an explicit split size, prefixes are split only with several threads,
// into about this many work items per thread, of at least MIN_SPLIT_BLOCKS.
constexpr int64_t TASKS_PER_THREAD = 8;
constexpr int64_t MIN_SPLIT_BLOCKS = 2;

inline vec16 load(const float* p) { vec16 v; __builtin_memcpy(&v, p, sizeof(v)); return v; }
inline void store(float* p, vec16 v) { __builtin_memcpy(p, &v, sizeof(v)); }
inline vec16 splat(float x) { return vec16{} + x; }
inline int round_up(int n) { return (n + LANES - 1) / LANES * LANES; }

// exp(x) for x <= 0 (scores minus the running max); exp(-inf) == 0 exactly.
inline vec16 exp_nonpositive(vec16 x) {
  const vec16 lo = splat(-87.0f);
  x = x < lo ? lo : x;
  vec16 n = x * 1.44269504088896341f;
  ivec16 ni = __builtin_convertvector(n - 0.5f, ivec16);  // floor for n <= 0
  ni = ni < -126 ? ivec16{} - 127 : ni;
  vec16 nf = __builtin_convertvector(ni, vec16);
  vec16 r = x - nf * 0.693359375f + nf * 2.12194440e-4f;  // x - n*ln2, two parts
  vec16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  vec16 scale;
  ivec16 bits = (ni + 127) << 23;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

typedef float vec8 __attribute__((vector_size(32)));
typedef float vec4 __attribute__((vector_size(16)));

// Horizontal max / sum in log2(16) steps.
template <typename Op>
inline float reduce(vec16 v, Op op) {
  const vec8 a = op(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7),
                    __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
  const vec4 b = op(__builtin_shufflevector(a, a, 0, 1, 2, 3), __builtin_shufflevector(a, a, 4, 5, 6, 7));
  return op(op(b[0], b[1]), op(b[2], b[3]));
}
inline float hmax(vec16 v) {
  return reduce(v, [](auto x, auto y) { return x > y ? x : y; });
}
inline float hsum(vec16 v) {
  return reduce(v, [](auto x, auto y) { return x + y; });
}

// dst[0:n] = float(src[0:n]).
inline void widen(const float* src, float* dst, int n) { std::copy(src, src + n, dst); }
inline void widen(const at::BFloat16* src, float* dst, int n) {
  int i = 0;
  for (; i + LANES <= n; i += LANES) {  // bf16 -> f32 is a 16-bit shift
    u16x16 h;
    __builtin_memcpy(&h, src + i, sizeof(h));
    const u32x16 w = __builtin_convertvector(h, u32x16) << 16;
    __builtin_memcpy(dst + i, &w, sizeof(w));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
inline void widen(const at::Half* src, float* dst, int n) {
  for (int i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// S[i][t0:t0+16*NV] = Q[i] . K[:, t0:...] for 4 rows at a time.
// q: [rows_pad][D]; k: [D][ldk]; s: [rows_pad][lds]
template <int D, int NV>
inline void qk_tile(const float* q, const float* k, int64_t ldk, float* s,
                    int64_t lds, int rows_pad, int t0) {
  for (int i0 = 0; i0 < rows_pad; i0 += 4) {
    vec16 acc[4][NV] = {};
    for (int d = 0; d < D; ++d) {
      vec16 kv[NV];
      for (int j = 0; j < NV; ++j) kv[j] = load(k + d * ldk + t0 + j * LANES);
      for (int r = 0; r < 4; ++r) {
        vec16 qv = splat(q[(i0 + r) * D + d]);
        for (int j = 0; j < NV; ++j) acc[r][j] += qv * kv[j];
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int j = 0; j < NV; ++j) store(s + (i0 + r) * lds + t0 + j * LANES, acc[r][j]);
  }
}

// ACC[i][:] += sum_t P[i][t] V[t][:] for t < valid.
// p: [rows_pad][ldp]; v: [valid][ldv]; acc: [rows_pad][D]
template <int D>
inline void pv(const float* p, int64_t ldp, const float* v, int64_t ldv, float* acc,
               int rows_pad, int valid) {
  constexpr int NVD = D / LANES;
  constexpr int ROWS = NVD >= 8 ? 2 : 4;
  for (int i0 = 0; i0 < rows_pad; i0 += ROWS) {
    vec16 a[ROWS][NVD];
    for (int r = 0; r < ROWS; ++r)
      for (int j = 0; j < NVD; ++j) a[r][j] = load(acc + (i0 + r) * D + j * LANES);
    for (int t = 0; t < valid; ++t) {
      vec16 vv[NVD];
      for (int j = 0; j < NVD; ++j) vv[j] = load(v + t * ldv + j * LANES);
      for (int r = 0; r < ROWS; ++r) {
        vec16 pb = splat(p[(i0 + r) * ldp + t]);
        for (int j = 0; j < NVD; ++j) a[r][j] += pb * vv[j];
      }
    }
    for (int r = 0; r < ROWS; ++r)
      for (int j = 0; j < NVD; ++j) store(acc + (i0 + r) * D + j * LANES, a[r][j]);
  }
}

// Which columns of a block row i sees: col < limit, and col <= its token
// (chain), and bit col of its token's ancestor words (tree). Row i belongs to
// token i / group.
struct BlockMask {
  int limit;
  int group;
  int num_tokens;                 // of the request (clamps padding rows)
  bool chain = false;
  const int32_t* bits = nullptr;  // tree: words of the request's first token
  int64_t bits_stride = 0;
};

// Online-softmax state of a work item's rows.
struct RowState {
  std::vector<float> q, s, acc, m, l;
  std::vector<uint32_t> q_pairs;  // bf16 pair path: Q rows as (d, d+1) pairs
  std::vector<uint16_t> p_bf16;   // and P rounded to bf16, row-major

  void reset(int rows_pad, int D, int cols_pad) {
    s.resize(static_cast<size_t>(rows_pad) * cols_pad);
    acc.assign(static_cast<size_t>(rows_pad) * D, 0.f);
    m.assign(rows_pad, NEG_INF);
    l.assign(rows_pad, 0.f);
  }
};

// The masked online-softmax step of one block: S (scores) -> P in place, the
// rows' max, sum and accumulators rescaled. Columns the mask hides get P = 0
// exactly, whatever S holds there.
template <int D>
void softmax_block(RowState& st, int rows_pad, int cols_pad, const BlockMask& mask) {
  float* s = st.s.data();
  const ivec16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  for (int i = 0; i < rows_pad; ++i) {
    float* row = s + i * cols_pad;
    const int token = std::min(i / mask.group, mask.num_tokens - 1);
    const int limit = mask.chain ? std::min(mask.limit, token + 1) : mask.limit;
    const int32_t* words = mask.bits ? mask.bits + token * mask.bits_stride : nullptr;
    vec16 mx = splat(NEG_INF);
    if (limit >= cols_pad && !words) {  // a whole unmasked block
      for (int c = 0; c < cols_pad; c += LANES) {
        const vec16 x = load(row + c);
        mx = mx > x ? mx : x;
      }
    } else {
      for (int c = 0; c < cols_pad; c += LANES) {
        const ivec16 col = lane + c;
        ivec16 visible = col < limit;
        if (words) visible &= ((ivec16{} + words[c / 32]) >> (col & 31) & 1) != 0;
        const vec16 x = visible ? load(row + c) : splat(NEG_INF);
        store(row + c, x);
        mx = mx > x ? mx : x;
      }
    }
    const float m_old = st.m[i];
    const float m_new = std::max(m_old, hmax(mx));
    if (m_new == NEG_INF) {  // nothing visible to this row yet
      std::fill(row, row + cols_pad, 0.f);
      continue;
    }
    vec16 sum = {};
    for (int c = 0; c < cols_pad; c += LANES) {
      const vec16 p = exp_nonpositive(load(row + c) - m_new);
      store(row + c, p);
      sum += p;
    }
    if (m_new != m_old) {  // rescale what the row holds so far
      const float alpha = m_old == NEG_INF ? 0.f : std::exp(m_old - m_new);
      st.l[i] *= alpha;
      float* a = st.acc.data() + i * D;
      for (int d = 0; d < D; ++d) a[d] *= alpha;
    }
    st.l[i] += hsum(sum);
    st.m[i] = m_new;
  }
}

// One block of keys into the rows' softmax, float32: k [D][ldk] (token stride
// 1), v [ncols][ldv]; st.q holds the scaled queries.
template <int D>
void attend_block(RowState& st, int rows_pad, const float* k, int64_t ldk, const float* v,
                  int64_t ldv, int ncols, int cols_pad, const BlockMask& mask) {
  float* s = st.s.data();
  int t0 = 0;
  for (; t0 + 4 * LANES <= cols_pad; t0 += 4 * LANES)
    qk_tile<D, 4>(st.q.data(), k, ldk, s, cols_pad, rows_pad, t0);
  for (; t0 < cols_pad; t0 += LANES) qk_tile<D, 1>(st.q.data(), k, ldk, s, cols_pad, rows_pad, t0);
  softmax_block<D>(st, rows_pad, cols_pad, mask);
  pv<D>(s, cols_pad, v, ldv, st.acc.data(), rows_pad, ncols);
}

#if LONGSPEC_BF16_PAIRS
// bf16 pairs: a uint32 holds two bf16, the lower one first in memory.
inline uint32_t pair(uint16_t lo, uint16_t hi) { return lo | (static_cast<uint32_t>(hi) << 16); }

// dst[t] = pair(a[t], b[t]) for t < n (b == nullptr: zeros), vectorised.
inline void interleave(const uint16_t* a, const uint16_t* b, uint32_t* dst, int n) {
  int t = 0;
  for (; t + LANES <= n; t += LANES) {
    u16x16 ha, hb = {};
    __builtin_memcpy(&ha, a + t, sizeof(ha));
    if (b) __builtin_memcpy(&hb, b + t, sizeof(hb));
    const u32x16 w = __builtin_convertvector(ha, u32x16) | __builtin_convertvector(hb, u32x16) << 16;
    __builtin_memcpy(dst + t, &w, sizeof(w));
  }
  for (; t < n; ++t) dst[t] = pair(a[t], b ? b[t] : 0);
}

// S[i][t0:t0+16*NV] = scale * Q[i] . K[:, t0:...], 4 rows at a time, from
// q: [rows_pad][D/2] pairs and k: [D/2][ldk] pairs (dims 2e, 2e+1 of a token).
template <int D, int NV>
inline void qk_tile_pairs(const uint32_t* q, const uint32_t* k, int64_t ldk, float* s,
                          int64_t lds, int rows_pad, int t0, float scale) {
  for (int i0 = 0; i0 < rows_pad; i0 += 4) {
    __m512 acc[4][NV];
    for (int r = 0; r < 4; ++r)
      for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_setzero_ps();
    for (int e = 0; e < D / 2; ++e) {
      __m512bh kv[NV];
      for (int j = 0; j < NV; ++j)
        kv[j] = (__m512bh)_mm512_loadu_si512(k + e * ldk + t0 + j * LANES);
      for (int r = 0; r < 4; ++r) {
        const __m512bh qv = (__m512bh)_mm512_set1_epi32(static_cast<int>(q[(i0 + r) * (D / 2) + e]));
        for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], qv, kv[j]);
      }
    }
    const __m512 sc = _mm512_set1_ps(scale);
    for (int r = 0; r < 4; ++r)
      for (int j = 0; j < NV; ++j)
        _mm512_storeu_ps(s + (i0 + r) * lds + t0 + j * LANES, _mm512_mul_ps(acc[r][j], sc));
  }
}

// ACC[i][:] += sum_t P[i][t] V[t][:], from p: [rows_pad][ldp] bf16 and
// v: [npairs][D] pairs (tokens 2u, 2u+1 of a dim).
template <int D>
inline void pv_pairs(const uint16_t* p, int64_t ldp, const uint32_t* v, float* acc,
                     int rows_pad, int npairs) {
  constexpr int NVD = D / LANES;
  constexpr int ROWS = NVD >= 8 ? 2 : 4;
  for (int i0 = 0; i0 < rows_pad; i0 += ROWS) {
    __m512 a[ROWS][NVD];
    for (int r = 0; r < ROWS; ++r)
      for (int j = 0; j < NVD; ++j) a[r][j] = _mm512_loadu_ps(acc + (i0 + r) * D + j * LANES);
    for (int u = 0; u < npairs; ++u) {
      __m512bh vv[NVD];
      for (int j = 0; j < NVD; ++j) vv[j] = (__m512bh)_mm512_loadu_si512(v + u * D + j * LANES);
      for (int r = 0; r < ROWS; ++r) {
        uint32_t pp;
        __builtin_memcpy(&pp, p + (i0 + r) * ldp + 2 * u, sizeof(pp));
        const __m512bh pb = (__m512bh)_mm512_set1_epi32(static_cast<int>(pp));
        for (int j = 0; j < NVD; ++j) a[r][j] = _mm512_dpbf16_ps(a[r][j], pb, vv[j]);
      }
    }
    for (int r = 0; r < ROWS; ++r)
      for (int j = 0; j < NVD; ++j) _mm512_storeu_ps(acc + (i0 + r) * D + j * LANES, a[r][j]);
  }
}

// attend_block with bf16 pairs: k [D/2][ldk], v [ceil(ncols/2)][D] (a missing
// last token is zero); st.q_pairs holds the unscaled queries.
template <int D>
void attend_block_pairs(RowState& st, int rows_pad, const uint32_t* k, int64_t ldk,
                        const uint32_t* v, int ncols, int cols_pad, const BlockMask& mask,
                        float scale) {
  float* s = st.s.data();
  int t0 = 0;
  for (; t0 + 4 * LANES <= cols_pad; t0 += 4 * LANES)
    qk_tile_pairs<D, 4>(st.q_pairs.data(), k, ldk, s, cols_pad, rows_pad, t0, scale);
  for (; t0 < cols_pad; t0 += LANES)
    qk_tile_pairs<D, 1>(st.q_pairs.data(), k, ldk, s, cols_pad, rows_pad, t0, scale);
  softmax_block<D>(st, rows_pad, cols_pad, mask);
  st.p_bf16.resize(static_cast<size_t>(rows_pad) * cols_pad);
  for (int i = 0; i < rows_pad; ++i)  // round P to bf16 (nearest even)
    for (int c = 0; c < cols_pad; c += LANES)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(st.p_bf16.data() + i * cols_pad + c),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(s + i * cols_pad + c)));
  pv_pairs<D>(st.p_bf16.data(), cols_pad, v, st.acc.data(), rows_pad, (ncols + 1) / 2);
}
#endif

struct Task {
  int64_t req, kv_head, split, block_begin, block_end;
  bool new_tokens;  // also attend the request's new tokens
};

template <int D, typename scalar_t>
void hybrid_attention_impl(const at::Tensor& query, const at::Tensor& key,
                           const at::Tensor& value, const at::Tensor& key_cache,
                           const at::Tensor& value_cache, const at::Tensor& block_table,
                           const at::Tensor& prefix_lens, const at::Tensor& query_start_loc,
                           const at::Tensor& ancestor_bits, double scale,
                           int64_t blocks_per_split, bool amx_packing, bool bf16_pairs,
                           at::Tensor& out, at::Tensor& lse) {
  const int64_t num_reqs = prefix_lens.size(0);
  const int64_t num_tokens = query.size(0);
  const int64_t num_heads = query.size(1);
  const int64_t num_kv_heads = key_cache.size(1);
  const int64_t block_size = key_cache.size(2);
  const int group = static_cast<int>(num_heads / num_kv_heads);
  const int bs_pad = round_up(static_cast<int>(block_size));
  const bool has_new = key.numel() > 0;

  const scalar_t* q_ptr = query.data_ptr<scalar_t>();
  const scalar_t* kc_ptr = key_cache.data_ptr<scalar_t>();
  const scalar_t* vc_ptr = value_cache.data_ptr<scalar_t>();
  const scalar_t* kn_ptr = has_new ? key.data_ptr<scalar_t>() : nullptr;
  const scalar_t* vn_ptr = has_new ? value.data_ptr<scalar_t>() : nullptr;
  const int32_t* bt = block_table.data_ptr<int32_t>();
  const int32_t* plen = prefix_lens.data_ptr<int32_t>();
  const int32_t* qsl = query_start_loc.data_ptr<int32_t>();
  const int32_t* bits = ancestor_bits.numel() > 0 ? ancestor_bits.data_ptr<int32_t>() : nullptr;
  const int64_t bits_stride = bits ? ancestor_bits.stride(0) : 0;
  const int64_t qs0 = query.stride(0), qs1 = query.stride(1);
  const int64_t kns0 = has_new ? key.stride(0) : 0, kns1 = has_new ? key.stride(1) : 0;
  const int64_t vns0 = has_new ? value.stride(0) : 0, vns1 = has_new ? value.stride(1) : 0;
  const int64_t ksb = key_cache.stride(0), ksh = key_cache.stride(1), ksd = key_cache.stride(3);
  const int64_t vsb = value_cache.stride(0), vsh = value_cache.stride(1), vst = value_cache.stride(2);
  const int64_t bts = block_table.stride(0);

  auto prefix_blocks = [&](int64_t r) { return (plen[r] + block_size - 1) / block_size; };
  if (blocks_per_split <= 0) {  // automatic: split only to give every thread work
    const int64_t threads = at::get_num_threads();
    int64_t total_blocks = 0;
    for (int64_t r = 0; r < num_reqs; ++r) total_blocks += prefix_blocks(r);
    blocks_per_split = threads == 1
        ? std::numeric_limits<int32_t>::max()
        : std::max(MIN_SPLIT_BLOCKS, (total_blocks * num_kv_heads + TASKS_PER_THREAD * threads - 1) /
                                         (TASKS_PER_THREAD * threads));
  }
  std::vector<Task> tasks;
  std::vector<int64_t> num_splits(num_reqs);
  int64_t max_splits = 1;
  for (int64_t r = 0; r < num_reqs; ++r) {
    const int64_t blocks = prefix_blocks(r);
    const int64_t splits = std::max<int64_t>(1, (blocks + blocks_per_split - 1) / blocks_per_split);
    num_splits[r] = splits;
    if (qsl[r + 1] == qsl[r]) continue;
    max_splits = std::max(max_splits, splits);
    for (int64_t h = 0; h < num_kv_heads; ++h)
      for (int64_t s = 0; s < splits; ++s)
        tasks.push_back({r, h, s, s * blocks_per_split,
                         std::min(blocks, (s + 1) * blocks_per_split),
                         has_new && s == splits - 1});
  }
  // Partial results of split requests: [max_splits, num_tokens, num_heads, D + 1]
  // (normalised output, then the lse).
  at::Tensor partial;
  float* part_ptr = nullptr;
  if (max_splits > 1) {
    partial = at::empty({max_splits, num_tokens, num_heads, D + 1}, query.options().dtype(at::kFloat));
    part_ptr = partial.data_ptr<float>();
  }
  const bool out_float = out.scalar_type() == at::kFloat;
  float* of_ptr = out_float ? out.data_ptr<float>() : nullptr;
  scalar_t* os_ptr = out_float ? nullptr : out.data_ptr<scalar_t>();
  float* l_ptr = lse.numel() > 0 ? lse.data_ptr<float>() : nullptr;
  const int64_t os0 = out.stride(0), os1 = out.stride(1);
  const int64_t ls0 = l_ptr ? lse.stride(0) : 0, ls1 = l_ptr ? lse.stride(1) : 0;
  // The final result of query token n, head hq: output a * inv and its lse.
  auto write_final = [&](int64_t n, int64_t hq, const float* a, float inv, float row_lse) {
    if (out_float) {
      float* dst = of_ptr + n * os0 + hq * os1;
      for (int d = 0; d < D; ++d) dst[d] = a[d] * inv;
    } else {
      scalar_t* dst = os_ptr + n * os0 + hq * os1;
      for (int d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(a[d] * inv);
    }
    if (l_ptr) l_ptr[n * ls0 + hq * ls1] = row_lse;
  };

  // The new tokens' mask for request r, whose first token is tok0.
  auto new_token_mask = [&](int64_t tok0, int ntok) {
    BlockMask mask{ntok, group, ntok};
    mask.chain = bits == nullptr;
    mask.bits = bits ? bits + tok0 * bits_stride : nullptr;
    mask.bits_stride = bits_stride;
    return mask;
  };

  // A task in float32 (16-bit pages widened): st.q, then every block.
  auto attend_float = [&](const Task& task, RowState& st, std::vector<float>& kbuf,
                          std::vector<float>& vbuf, int rows_pad) {
    const int64_t r = task.req, h = task.kv_head, tok0 = qsl[r];
    const int ntok = qsl[r + 1] - qsl[r];
    // Row i = token i / group, head h * group + i % group; padding rows zero.
    st.q.assign(static_cast<size_t>(rows_pad) * D, 0.f);
    for (int i = 0; i < ntok * group; ++i) {
      float* dst = st.q.data() + i * D;
      widen(q_ptr + (tok0 + i / group) * qs0 + (h * group + i % group) * qs1, dst, D);
      for (int d = 0; d < D; ++d) dst[d] *= static_cast<float>(scale);
    }
    for (int64_t b = task.block_begin; b < task.block_end; ++b) {
      const int valid = static_cast<int>(std::min<int64_t>(block_size, plen[r] - b * block_size));
      const int64_t page = bt[r * bts + b];
      const scalar_t* kp = kc_ptr + page * ksb + h * ksh;
      const scalar_t* vp = vc_ptr + page * vsb + h * vsh;
      const float* kf;
      const float* vf;
      int64_t ldk, ldv;
      if (amx_packing) {
        // keys [block/16, D/2, 16, 2], values [D/16, block/2, 16, 2] per page.
        kbuf.assign(static_cast<size_t>(D) * bs_pad, 0.f);
        vbuf.resize(static_cast<size_t>(block_size) * D);
        for (int d = 0; d < D; ++d)
          for (int t = 0; t < valid; ++t)
            kbuf[d * bs_pad + t] =
                static_cast<float>(kp[((t / 16) * (D / 2) + d / 2) * 32 + (t % 16) * 2 + d % 2]);
        for (int t = 0; t < valid; ++t)
          for (int d = 0; d < D; ++d)
            vbuf[t * D + d] = static_cast<float>(
                vp[((d / 16) * (block_size / 2) + t / 2) * 32 + (d % 16) * 2 + t % 2]);
        kf = kbuf.data(); ldk = bs_pad; vf = vbuf.data(); ldv = D;
      } else if (std::is_same_v<scalar_t, float> && bs_pad == block_size) {
        kf = reinterpret_cast<const float*>(kp); ldk = ksd;
        vf = reinterpret_cast<const float*>(vp); ldv = vst;
      } else {  // widen (and pad to whole vectors)
        kbuf.assign(static_cast<size_t>(D) * bs_pad, 0.f);
        vbuf.resize(static_cast<size_t>(block_size) * D);
        for (int d = 0; d < D; ++d) widen(kp + d * ksd, kbuf.data() + d * bs_pad, valid);
        for (int t = 0; t < valid; ++t) widen(vp + t * vst, vbuf.data() + t * D, D);
        kf = kbuf.data(); ldk = bs_pad; vf = vbuf.data(); ldv = D;
      }
      attend_block<D>(st, rows_pad, kf, ldk, vf, ldv, valid, bs_pad,
                      BlockMask{valid, group, ntok});
    }
    if (task.new_tokens) {  // the new tokens: keys transposed to [D][new_pad]
      const int new_pad = round_up(ntok);
      kbuf.assign(static_cast<size_t>(D) * new_pad, 0.f);
      vbuf.resize(static_cast<size_t>(ntok) * D);
      float krow[D];
      for (int j = 0; j < ntok; ++j) {
        widen(kn_ptr + (tok0 + j) * kns0 + h * kns1, krow, D);
        for (int d = 0; d < D; ++d) kbuf[d * new_pad + j] = krow[d];
        widen(vn_ptr + (tok0 + j) * vns0 + h * vns1, vbuf.data() + j * D, D);
      }
      attend_block<D>(st, rows_pad, kbuf.data(), new_pad, vbuf.data(), D, ntok, new_pad,
                      new_token_mask(tok0, ntok));
    }
  };

#if LONGSPEC_BF16_PAIRS
  // A bf16 task with pairs: st.q_pairs, then every block repacked into pairs.
  auto attend_pairs = [&](const Task& task, RowState& st, std::vector<uint32_t>& kbuf,
                          std::vector<uint32_t>& vbuf, int rows_pad) {
    const int64_t r = task.req, h = task.kv_head, tok0 = qsl[r];
    const int ntok = qsl[r + 1] - qsl[r];
    auto bits16 = [](const scalar_t* x) { return reinterpret_cast<const uint16_t*>(x); };
    st.q_pairs.assign(static_cast<size_t>(rows_pad) * (D / 2), 0u);
    for (int i = 0; i < ntok * group; ++i)
      __builtin_memcpy(st.q_pairs.data() + i * (D / 2),
                       q_ptr + (tok0 + i / group) * qs0 + (h * group + i % group) * qs1,
                       D * sizeof(scalar_t));
    for (int64_t b = task.block_begin; b < task.block_end; ++b) {
      const int valid = static_cast<int>(std::min<int64_t>(block_size, plen[r] - b * block_size));
      const int64_t page = bt[r * bts + b];
      const uint16_t* kp = bits16(kc_ptr + page * ksb + h * ksh);  // [D][ksd]
      const uint16_t* vp = bits16(vc_ptr + page * vsb + h * vsh);  // [block][vst]
      kbuf.assign(static_cast<size_t>(D / 2) * bs_pad, 0u);
      for (int e = 0; e < D / 2; ++e)
        interleave(kp + 2 * e * ksd, kp + (2 * e + 1) * ksd, kbuf.data() + e * bs_pad, valid);
      const int npairs = (valid + 1) / 2;
      vbuf.resize(static_cast<size_t>(npairs) * D);
      for (int u = 0; u < npairs; ++u)
        interleave(vp + 2 * u * vst, 2 * u + 1 < valid ? vp + (2 * u + 1) * vst : nullptr,
                   vbuf.data() + u * D, D);
      attend_block_pairs<D>(st, rows_pad, kbuf.data(), bs_pad, vbuf.data(), valid, bs_pad,
                            BlockMask{valid, group, ntok}, static_cast<float>(scale));
    }
    if (task.new_tokens) {  // key pairs are 32-bit words of a key row: transpose them
      const int new_pad = round_up(ntok);
      kbuf.assign(static_cast<size_t>(D / 2) * new_pad, 0u);
      for (int j = 0; j < ntok; ++j) {
        uint32_t words[D / 2];
        __builtin_memcpy(words, kn_ptr + (tok0 + j) * kns0 + h * kns1, sizeof(words));
        for (int e = 0; e < D / 2; ++e) kbuf[e * new_pad + j] = words[e];
      }
      const int npairs = (ntok + 1) / 2;
      vbuf.resize(static_cast<size_t>(npairs) * D);
      for (int u = 0; u < npairs; ++u)
        interleave(bits16(vn_ptr + (tok0 + 2 * u) * vns0 + h * vns1),
                   2 * u + 1 < ntok ? bits16(vn_ptr + (tok0 + 2 * u + 1) * vns0 + h * vns1)
                                    : nullptr,
                   vbuf.data() + u * D, D);
      attend_block_pairs<D>(st, rows_pad, kbuf.data(), new_pad, vbuf.data(), ntok, new_pad,
                            new_token_mask(tok0, ntok), static_cast<float>(scale));
    }
  };
#endif

  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    RowState st;
    std::vector<float> kbuf, vbuf;
    std::vector<uint32_t> kpairs, vpairs;
    for (int64_t ti = begin; ti < end; ++ti) {
      const Task& task = tasks[ti];
      const int64_t r = task.req, h = task.kv_head;
      const int64_t tok0 = qsl[r];
      const int ntok = qsl[r + 1] - qsl[r];
      const int rows = ntok * group;
      const int rows_pad = (rows + 3) / 4 * 4;
      const int new_pad = task.new_tokens ? round_up(ntok) : 0;
      st.reset(rows_pad, D, std::max(bs_pad, new_pad));
      bool done = false;
#if LONGSPEC_BF16_PAIRS
      if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
        if (bf16_pairs && !amx_packing) {
          attend_pairs(task, st, kpairs, vpairs, rows_pad);
          done = true;
        }
      }
#endif
      if (!done) attend_float(task, st, kbuf, vbuf, rows_pad);
      // Write: the final result when the request has one split, else a partial.
      for (int i = 0; i < rows; ++i) {
        const int64_t n = tok0 + i / group, hq = h * group + i % group;
        const float li = st.l[i];
        const float inv = li > 0.f ? 1.f / li : 0.f;
        const float row_lse = li > 0.f ? st.m[i] + std::log(li) : NEG_INF;
        const float* a = st.acc.data() + i * D;
        if (num_splits[r] == 1) {
          write_final(n, hq, a, inv, row_lse);
        } else {
          float* dst = part_ptr + ((task.split * num_tokens + n) * num_heads + hq) * (D + 1);
          for (int d = 0; d < D; ++d) dst[d] = a[d] * inv;
          dst[D] = row_lse;
        }
      }
    }
  });

  if (max_splits == 1) return;
  // Merge the splits of every split request by their lse.
  at::parallel_for(0, num_reqs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t splits = num_splits[r];
      if (splits == 1) continue;
      for (int64_t n = qsl[r]; n < qsl[r + 1]; ++n) {
        for (int64_t hq = 0; hq < num_heads; ++hq) {
          auto part = [&](int64_t s) {
            return part_ptr + ((s * num_tokens + n) * num_heads + hq) * (D + 1);
          };
          float lse_max = NEG_INF;
          for (int64_t s = 0; s < splits; ++s) lse_max = std::max(lse_max, part(s)[D]);
          float o[D] = {};
          float total = 0.f;
          if (lse_max != NEG_INF) {
            for (int64_t s = 0; s < splits; ++s) {
              const float w = std::exp(part(s)[D] - lse_max);
              total += w;
              for (int d = 0; d < D; ++d) o[d] += w * part(s)[d];
            }
          }
          write_final(n, hq, o, total > 0.f ? 1.f / total : 0.f,
                      total > 0.f ? lse_max + std::log(total) : NEG_INF);
        }
      }
    }
  });
}

// Shapes, dtypes and strides are validated by the Python wrapper
// (kernels.checks); the checks here guard memory safety only.
void hybrid_attention(at::Tensor query, at::Tensor key, at::Tensor value, at::Tensor key_cache,
                      at::Tensor value_cache, at::Tensor block_table, at::Tensor prefix_lens,
                      at::Tensor query_start_loc, at::Tensor ancestor_bits, double scale,
                      int64_t blocks_per_split, bool amx_packing, bool bf16_pairs,
                      at::Tensor out, at::Tensor lse) {
  TORCH_CHECK(query.dim() == 3 && key_cache.dim() == 4 && value_cache.dim() == 4);
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1, "head dim must be contiguous");
  TORCH_CHECK(out.sizes() == query.sizes(), "out must have the query's shape");
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == query.scalar_type(),
              "out must be float32 or the query dtype");
  TORCH_CHECK(lse.numel() == 0 || (lse.scalar_type() == at::kFloat && lse.dim() == 2 &&
                                   lse.size(0) == query.size(0) && lse.size(1) == query.size(1)),
              "lse must be empty or [num_tokens, num_heads] float32");
  TORCH_CHECK(key_cache.scalar_type() == query.scalar_type() &&
              value_cache.scalar_type() == query.scalar_type());
  TORCH_CHECK(amx_packing || key_cache.stride(2) == 1, "key pages must be token-contiguous (vLLM 'vec' packing)");
  TORCH_CHECK(value_cache.stride(3) == 1, "value pages must be rows");
  TORCH_CHECK(!amx_packing || query.element_size() == 2, "amx packing holds 16-bit dtypes only");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && prefix_lens.scalar_type() == at::kInt &&
              query_start_loc.scalar_type() == at::kInt);
  TORCH_CHECK(block_table.stride(1) == 1 && prefix_lens.is_contiguous() && query_start_loc.is_contiguous());
  TORCH_CHECK(query_start_loc.size(0) == prefix_lens.size(0) + 1 &&
              block_table.size(0) >= prefix_lens.size(0));
  if (key.numel() > 0) {
    TORCH_CHECK(key.dim() == 3 && value.dim() == 3 && key.size(0) == query.size(0) &&
                value.sizes() == key.sizes() && key.size(1) == key_cache.size(1));
    TORCH_CHECK(key.stride(2) == 1 && value.stride(2) == 1, "head dim must be contiguous");
    TORCH_CHECK(key.scalar_type() == query.scalar_type() && value.scalar_type() == query.scalar_type());
    const int32_t* qsl = query_start_loc.data_ptr<int32_t>();
    const int64_t max_new = ancestor_bits.numel() > 0 ? ancestor_bits.size(1) * 32 : 1 << 20;
    for (int64_t r = 0; r < prefix_lens.size(0); ++r)
      TORCH_CHECK(qsl[r + 1] - qsl[r] <= max_new,
                  "a request has more new tokens than ancestor_bits has bits");
  }
  TORCH_CHECK(ancestor_bits.numel() == 0 ||
              (key.numel() > 0 && ancestor_bits.scalar_type() == at::kInt &&
               ancestor_bits.stride(1) == 1 && ancestor_bits.size(0) == query.size(0)));
#define LONGSPEC_DISPATCH(D, scalar_t)                                                      \
  return hybrid_attention_impl<D, scalar_t>(query, key, value, key_cache, value_cache,      \
                                            block_table, prefix_lens, query_start_loc,      \
                                            ancestor_bits, scale, blocks_per_split,          \
                                            amx_packing, bf16_pairs, out, lse)
#define LONGSPEC_DISPATCH_DTYPE(D)                                                          \
  switch (query.scalar_type()) {                                                            \
    case at::kFloat: LONGSPEC_DISPATCH(D, float);                                           \
    case at::kBFloat16: LONGSPEC_DISPATCH(D, at::BFloat16);                                 \
    case at::kHalf: LONGSPEC_DISPATCH(D, at::Half);                                         \
    default: TORCH_CHECK(false, "hybrid_attention: unsupported dtype ", query.scalar_type()); \
  }
  switch (query.size(2)) {
    case 64: LONGSPEC_DISPATCH_DTYPE(64)
    case 128: LONGSPEC_DISPATCH_DTYPE(128)
    default: TORCH_CHECK(false, "hybrid_attention: head size ", query.size(2), " not compiled");
  }
#undef LONGSPEC_DISPATCH_DTYPE
#undef LONGSPEC_DISPATCH
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("hybrid_attention", &hybrid_attention,
        "Paged prefix (+ masked new tokens) attention over vLLM's CPU cache, one softmax");
  m.def("has_bf16_pairs", [] { return LONGSPEC_BF16_PAIRS == 1; },
        "Whether bfloat16 runs on vdpbf16ps (compiled for a CPU with AVX512_BF16)");
}
