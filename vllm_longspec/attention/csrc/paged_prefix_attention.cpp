// Paged prefix attention with log-sum-exp on CPU, reading vLLM's CPU KV cache
// ("vec"/"vec16" packing) in place.
//
// Each query token of request r attends cache positions [0, prefix_lens[r]) of
// its block table, no mask. Keys and values arrive as logical views
// [num_blocks, num_kv_heads, block_size, head_size] whose strides say where
// each element lives: vLLM's "vec" packing stores a key page transposed
// (token stride 1, dim stride block_size) and a value page as rows (dim
// stride 1), which is exactly what the two inner products below want.
//
// Work item: (request, kv head, split of the prefix blocks). Its rows are the
// request's query tokens times the query heads sharing that kv head. Per block:
// S = Q K^T (register-blocked), online softmax, ACC += P V. Splits are merged
// by log-sum-exp at the end (FlashDecoding). Math in float32; bf16/fp16 pages
// are widened once per block into a small scratch, decoding vLLM's "amx" tile
// packing on the way when amx_packing is set. The output is float32.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

typedef float vec16 __attribute__((vector_size(64)));
typedef int ivec16 __attribute__((vector_size(64)));
constexpr int LANES = 16;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

inline vec16 load(const float* p) { vec16 v; __builtin_memcpy(&v, p, sizeof(v)); return v; }
inline void store(float* p, vec16 v) { __builtin_memcpy(p, &v, sizeof(v)); }
inline vec16 splat(float x) { return vec16{} + x; }

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

inline float hmax(vec16 v) {
  float m = v[0];
  for (int i = 1; i < LANES; ++i) m = std::max(m, v[i]);
  return m;
}
inline float hsum(vec16 v) {
  float s = 0.f;
  for (int i = 0; i < LANES; ++i) s += v[i];
  return s;
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

struct Task {
  int64_t req, kv_head, split, block_begin, block_end;
};

template <typename T>
inline float widen(T x) { return static_cast<float>(x); }

template <int D, typename scalar_t>
void prefix_attention(const at::Tensor& query, const at::Tensor& key_cache,
                      const at::Tensor& value_cache, const at::Tensor& block_table,
                      const at::Tensor& prefix_lens, const at::Tensor& query_start_loc,
                      double scale, int64_t blocks_per_split, bool amx_packing,
                      at::Tensor& out, at::Tensor& lse) {
  const int64_t num_reqs = prefix_lens.size(0);
  const int64_t num_heads = query.size(1);
  const int64_t num_kv_heads = key_cache.size(1);
  const int64_t block_size = key_cache.size(2);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t bs_pad = (block_size + LANES - 1) / LANES * LANES;

  const scalar_t* q_ptr = query.data_ptr<scalar_t>();
  const scalar_t* k_ptr = key_cache.data_ptr<scalar_t>();
  const scalar_t* v_ptr = value_cache.data_ptr<scalar_t>();
  const int32_t* bt = block_table.data_ptr<int32_t>();
  const int32_t* plen = prefix_lens.data_ptr<int32_t>();
  const int32_t* qsl = query_start_loc.data_ptr<int32_t>();
  const int64_t qs0 = query.stride(0), qs1 = query.stride(1);
  const int64_t ksb = key_cache.stride(0), ksh = key_cache.stride(1), ksd = key_cache.stride(3);
  const int64_t vsb = value_cache.stride(0), vsh = value_cache.stride(1), vst = value_cache.stride(2);
  const int64_t bts = block_table.stride(0);

  // Tasks and the split count of every request.
  std::vector<Task> tasks;
  std::vector<int64_t> num_splits(num_reqs);
  int64_t max_splits = 1;
  for (int64_t r = 0; r < num_reqs; ++r) {
    const int64_t blocks = (plen[r] + block_size - 1) / block_size;
    const int64_t splits = std::max<int64_t>(1, (blocks + blocks_per_split - 1) / blocks_per_split);
    num_splits[r] = splits;
    max_splits = std::max(max_splits, splits);
    if (qsl[r + 1] == qsl[r]) continue;
    for (int64_t h = 0; h < num_kv_heads; ++h)
      for (int64_t s = 0; s < splits; ++s)
        tasks.push_back({r, h, s, s * blocks_per_split,
                         std::min(blocks, (s + 1) * blocks_per_split)});
  }
  const int64_t num_tokens = query.size(0);
  // Partial results of split requests: [max_splits, num_tokens, num_heads, D + 1]
  // (normalised output, then the lse).
  at::Tensor partial;
  float* part_ptr = nullptr;
  if (max_splits > 1) {
    partial = at::empty({max_splits, num_tokens, num_heads, D + 1}, query.options().dtype(at::kFloat));
    part_ptr = partial.data_ptr<float>();
  }
  float* o_ptr = out.data_ptr<float>();
  float* l_ptr = lse.data_ptr<float>();
  const int64_t os0 = out.stride(0), os1 = out.stride(1);
  const int64_t ls0 = lse.stride(0), ls1 = lse.stride(1);

  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kbuf, vbuf, qbuf, sbuf, acc, m, l;
    for (int64_t ti = begin; ti < end; ++ti) {
      const Task& task = tasks[ti];
      const int64_t r = task.req, h = task.kv_head;
      const int64_t tok0 = qsl[r], ntok = qsl[r + 1] - qsl[r];
      const int rows = static_cast<int>(ntok * group);
      const int rows_pad = (rows + 3) / 4 * 4;
      qbuf.assign(static_cast<size_t>(rows_pad) * D, 0.f);
      sbuf.resize(static_cast<size_t>(rows_pad) * bs_pad);
      acc.assign(static_cast<size_t>(rows_pad) * D, 0.f);
      m.assign(rows_pad, NEG_INF);
      l.assign(rows_pad, 0.f);
      // Row i = token t, head h * group + g, with i = t * group + g.
      for (int i = 0; i < rows; ++i) {
        const scalar_t* src = q_ptr + (tok0 + i / group) * qs0 + (h * group + i % group) * qs1;
        for (int d = 0; d < D; ++d) qbuf[i * D + d] = widen(src[d]) * static_cast<float>(scale);
      }
      for (int64_t b = task.block_begin; b < task.block_end; ++b) {
        const int valid = static_cast<int>(std::min<int64_t>(block_size, plen[r] - b * block_size));
        const int64_t page = bt[r * bts + b];
        const scalar_t* kp = k_ptr + page * ksb + h * ksh;  // [D][ksd], token stride 1
        const scalar_t* vp = v_ptr + page * vsb + h * vsh;  // [block][vst], dim stride 1
        const float* kf;
        const float* vf;
        int64_t ldk, ldv;
        if constexpr (!std::is_same_v<scalar_t, float>) {
          if (amx_packing) {
            // keys [block/16, D/2, 16, 2], values [D/16, block/2, 16, 2] per page.
            kbuf.resize(static_cast<size_t>(D) * bs_pad);
            vbuf.resize(static_cast<size_t>(block_size) * D);
            for (int d = 0; d < D; ++d) {
              float* dst = kbuf.data() + d * bs_pad;
              for (int t = 0; t < valid; ++t)
                dst[t] = widen(kp[((t / 16) * (D / 2) + d / 2) * 32 + (t % 16) * 2 + d % 2]);
              for (int t = valid; t < bs_pad; ++t) dst[t] = 0.f;
            }
            for (int t = 0; t < valid; ++t)
              for (int d = 0; d < D; ++d)
                vbuf[t * D + d] = widen(vp[((d / 16) * (block_size / 2) + t / 2) * 32 + (d % 16) * 2 + t % 2]);
          }
        }
        if (amx_packing) {
          kf = kbuf.data(); ldk = bs_pad; vf = vbuf.data(); ldv = D;
        } else if constexpr (std::is_same_v<scalar_t, float>) {
          kf = kp; ldk = ksd; vf = vp; ldv = vst;
          if (bs_pad != block_size) {  // the register tiles need whole vectors
            kbuf.assign(static_cast<size_t>(D) * bs_pad, 0.f);
            for (int d = 0; d < D; ++d)
              for (int t = 0; t < valid; ++t) kbuf[d * bs_pad + t] = kp[d * ksd + t];
            kf = kbuf.data(); ldk = bs_pad;
          }
        } else {
          kbuf.resize(static_cast<size_t>(D) * bs_pad);
          vbuf.resize(static_cast<size_t>(block_size) * D);
          for (int d = 0; d < D; ++d) {
            const scalar_t* row = kp + d * ksd;
            float* dst = kbuf.data() + d * bs_pad;
            for (int t = 0; t < valid; ++t) dst[t] = widen(row[t]);
            for (int t = valid; t < bs_pad; ++t) dst[t] = 0.f;
          }
          for (int t = 0; t < valid; ++t) {
            const scalar_t* row = vp + t * vst;
            float* dst = vbuf.data() + t * D;
            for (int d = 0; d < D; ++d) dst[d] = widen(row[d]);
          }
          kf = kbuf.data(); ldk = bs_pad; vf = vbuf.data(); ldv = D;
        }
        float* s = sbuf.data();
        int t0 = 0;
        for (; t0 + 4 * LANES <= bs_pad; t0 += 4 * LANES) qk_tile<D, 4>(qbuf.data(), kf, ldk, s, bs_pad, rows_pad, t0);
        for (; t0 < bs_pad; t0 += LANES) qk_tile<D, 1>(qbuf.data(), kf, ldk, s, bs_pad, rows_pad, t0);
        // Online softmax: columns >= valid are masked.
        for (int i = 0; i < rows_pad; ++i) {
          float* row = s + i * bs_pad;
          vec16 mx = splat(NEG_INF);
          for (int c = 0; c < bs_pad; c += LANES) {
            vec16 x = load(row + c);
            ivec16 col = ivec16{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15} + c;
            x = col < valid ? x : splat(NEG_INF);
            store(row + c, x);
            mx = mx > x ? mx : x;
          }
          const float m_new = std::max(m[i], hmax(mx));
          const float alpha = m[i] == NEG_INF ? 0.f : std::exp(m[i] - m_new);
          vec16 sum = {};
          for (int c = 0; c < bs_pad; c += LANES) {
            vec16 p = exp_nonpositive(load(row + c) - m_new);
            store(row + c, p);
            sum += p;
          }
          l[i] = l[i] * alpha + hsum(sum);
          m[i] = m_new;
          float* a = acc.data() + i * D;
          for (int d = 0; d < D; ++d) a[d] *= alpha;
        }
        pv<D>(s, bs_pad, vf, ldv, acc.data(), rows_pad, valid);
      }
      // Write: final output when the request has one split, else a partial.
      for (int i = 0; i < rows; ++i) {
        const int64_t n = tok0 + i / group, hq = h * group + i % group;
        const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
        const float row_lse = l[i] > 0.f ? m[i] + std::log(l[i]) : NEG_INF;
        const float* a = acc.data() + i * D;
        if (num_splits[r] == 1) {
          float* dst = o_ptr + n * os0 + hq * os1;
          for (int d = 0; d < D; ++d) dst[d] = a[d] * inv;
          l_ptr[n * ls0 + hq * ls1] = row_lse;
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
          float lse_max = NEG_INF;
          for (int64_t s = 0; s < splits; ++s)
            lse_max = std::max(lse_max, part_ptr[((s * num_tokens + n) * num_heads + hq) * (D + 1) + D]);
          float o[D] = {};
          float total = 0.f;
          if (lse_max != NEG_INF) {
            for (int64_t s = 0; s < splits; ++s) {
              const float* src = part_ptr + ((s * num_tokens + n) * num_heads + hq) * (D + 1);
              const float w = std::exp(src[D] - lse_max);
              total += w;
              for (int d = 0; d < D; ++d) o[d] += w * src[d];
            }
          }
          float* dst = o_ptr + n * os0 + hq * os1;
          const float inv = total > 0.f ? 1.f / total : 0.f;
          for (int d = 0; d < D; ++d) dst[d] = o[d] * inv;
          l_ptr[n * ls0 + hq * ls1] = total > 0.f ? lse_max + std::log(total) : NEG_INF;
        }
      }
    }
  });
}

template <int D>
void dispatch_dtype(const at::Tensor& query, const at::Tensor& key_cache,
                    const at::Tensor& value_cache, const at::Tensor& block_table,
                    const at::Tensor& prefix_lens, const at::Tensor& query_start_loc,
                    double scale, int64_t blocks_per_split, bool amx_packing, at::Tensor& out,
                    at::Tensor& lse) {
  switch (query.scalar_type()) {
    case at::kFloat:
      return prefix_attention<D, float>(query, key_cache, value_cache, block_table, prefix_lens,
                                        query_start_loc, scale, blocks_per_split, amx_packing, out, lse);
    case at::kBFloat16:
      return prefix_attention<D, at::BFloat16>(query, key_cache, value_cache, block_table, prefix_lens,
                                               query_start_loc, scale, blocks_per_split, amx_packing, out, lse);
    case at::kHalf:
      return prefix_attention<D, at::Half>(query, key_cache, value_cache, block_table, prefix_lens,
                                           query_start_loc, scale, blocks_per_split, amx_packing, out, lse);
    default:
      TORCH_CHECK(false, "paged_prefix_attention: unsupported dtype ", query.scalar_type());
  }
}

// Shapes and strides are validated by the Python wrapper; the checks here guard
// memory safety only.
void paged_prefix_attention(at::Tensor query, at::Tensor key_cache, at::Tensor value_cache,
                            at::Tensor block_table, at::Tensor prefix_lens,
                            at::Tensor query_start_loc, double scale, int64_t blocks_per_split,
                            bool amx_packing, at::Tensor out, at::Tensor lse) {
  TORCH_CHECK(query.dim() == 3 && key_cache.dim() == 4 && value_cache.dim() == 4);
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1, "head dim must be contiguous");
  TORCH_CHECK(amx_packing || key_cache.stride(2) == 1, "key pages must be token-contiguous (vLLM 'vec' packing)");
  TORCH_CHECK(value_cache.stride(3) == 1, "value pages must be rows");
  TORCH_CHECK(!amx_packing || query.element_size() == 2, "amx packing holds 16-bit dtypes only");
  TORCH_CHECK(out.scalar_type() == at::kFloat, "out must be float32");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && prefix_lens.scalar_type() == at::kInt &&
              query_start_loc.scalar_type() == at::kInt && lse.scalar_type() == at::kFloat);
  TORCH_CHECK(block_table.stride(1) == 1 && prefix_lens.is_contiguous() && query_start_loc.is_contiguous());
  TORCH_CHECK(blocks_per_split >= 1);
  switch (query.size(2)) {
    case 64:
      return dispatch_dtype<64>(query, key_cache, value_cache, block_table, prefix_lens,
                                query_start_loc, scale, blocks_per_split, amx_packing, out, lse);
    case 128:
      return dispatch_dtype<128>(query, key_cache, value_cache, block_table, prefix_lens,
                                 query_start_loc, scale, blocks_per_split, amx_packing, out, lse);
    default:
      TORCH_CHECK(false, "paged_prefix_attention: head size ", query.size(2), " not compiled");
  }
}

// The speculative part of hybrid attention, merged into the prefix result in
// place. Query token n (index i within request r) attends the request's new
// tokens j it may see: bit j of ancestor_bits[n] (a tree), or j <= i (a chain,
// ancestor_bits empty). The prefix's (out, lse) enters the same softmax as one
// more term, so the result is exactly prefix + masked part merged by their
// LSEs. out [T, H, D] and lse [T, H] (float32) hold the prefix result on entry
// and the hybrid result on exit.
template <int D, typename scalar_t>
void spec_merge(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                const at::Tensor& query_start_loc, const at::Tensor& ancestor_bits, double scale,
                at::Tensor& out, at::Tensor& lse) {
  const int64_t num_reqs = query_start_loc.size(0) - 1;
  const int64_t num_heads = query.size(1), num_kv_heads = key.size(1);
  const int64_t group = num_heads / num_kv_heads;
  const int32_t* qsl = query_start_loc.data_ptr<int32_t>();
  const scalar_t* q_ptr = query.data_ptr<scalar_t>();
  const scalar_t* k_ptr = key.data_ptr<scalar_t>();
  const scalar_t* v_ptr = value.data_ptr<scalar_t>();
  const int64_t qs0 = query.stride(0), qs1 = query.stride(1);
  const int64_t ks0 = key.stride(0), ks1 = key.stride(1);
  const int64_t vs0 = value.stride(0), vs1 = value.stride(1);
  const bool tree = ancestor_bits.numel() > 0;
  const int32_t* bits = tree ? ancestor_bits.data_ptr<int32_t>() : nullptr;
  const int64_t bs0 = tree ? ancestor_bits.stride(0) : 0;
  float* o_ptr = out.data_ptr<float>();
  float* l_ptr = lse.data_ptr<float>();
  const int64_t os0 = out.stride(0), os1 = out.stride(1);
  const int64_t ls0 = lse.stride(0), ls1 = lse.stride(1);

  at::parallel_for(0, num_reqs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t tok0 = qsl[r], ntok = qsl[r + 1] - qsl[r];
      scores.resize(ntok);
      for (int64_t i = 0; i < ntok; ++i) {
        const int64_t n = tok0 + i;
        for (int64_t hq = 0; hq < num_heads; ++hq) {
          const int64_t h = hq / group;
          float q[D];
          const scalar_t* qs = q_ptr + n * qs0 + hq * qs1;
          for (int d = 0; d < D; ++d) q[d] = widen(qs[d]) * static_cast<float>(scale);
          float* o = o_ptr + n * os0 + hq * os1;
          float& row_lse = l_ptr[n * ls0 + hq * ls1];
          float m = row_lse;
          for (int64_t j = 0; j < ntok; ++j) {
            const bool visible = tree ? ((bits[n * bs0 + j / 32] >> (j % 32)) & 1) : j <= i;
            if (!visible) {
              scores[j] = NEG_INF;
              continue;
            }
            const scalar_t* ks = k_ptr + (tok0 + j) * ks0 + h * ks1;
            float dot = 0.f;
            for (int d = 0; d < D; ++d) dot += q[d] * widen(ks[d]);
            scores[j] = dot;
            m = std::max(m, dot);
          }
          if (m == NEG_INF) {  // nothing visible on either side
            for (int d = 0; d < D; ++d) o[d] = 0.f;
            row_lse = NEG_INF;
            continue;
          }
          const float w_prefix = row_lse == NEG_INF ? 0.f : std::exp(row_lse - m);
          float acc[D];
          for (int d = 0; d < D; ++d) acc[d] = w_prefix * o[d];
          float total = w_prefix;
          for (int64_t j = 0; j < ntok; ++j) {
            if (scores[j] == NEG_INF) continue;
            const float p = std::exp(scores[j] - m);
            total += p;
            const scalar_t* vs = v_ptr + (tok0 + j) * vs0 + h * vs1;
            for (int d = 0; d < D; ++d) acc[d] += p * widen(vs[d]);
          }
          const float inv = 1.f / total;
          for (int d = 0; d < D; ++d) o[d] = acc[d] * inv;
          row_lse = m + std::log(total);
        }
      }
    }
  });
}

// Shapes are validated by the Python wrapper (kernels.checks); the checks here
// guard memory safety only.
void merge_spec_attention(at::Tensor query, at::Tensor key, at::Tensor value,
                          at::Tensor query_start_loc, at::Tensor ancestor_bits, double scale,
                          at::Tensor out, at::Tensor lse) {
  TORCH_CHECK(query.dim() == 3 && key.dim() == 3 && value.dim() == 3);
  TORCH_CHECK(query.stride(2) == 1 && key.stride(2) == 1 && value.stride(2) == 1 &&
              out.stride(2) == 1, "head dim must be contiguous");
  TORCH_CHECK(key.scalar_type() == query.scalar_type() && value.scalar_type() == query.scalar_type());
  TORCH_CHECK(out.scalar_type() == at::kFloat && lse.scalar_type() == at::kFloat,
              "out and lse must be float32");
  TORCH_CHECK(query_start_loc.scalar_type() == at::kInt && query_start_loc.is_contiguous());
  TORCH_CHECK(ancestor_bits.numel() == 0 ||
              (ancestor_bits.scalar_type() == at::kInt && ancestor_bits.stride(1) == 1 &&
               ancestor_bits.size(0) == query.size(0)));
  if (ancestor_bits.numel() > 0) {
    const int32_t* qsl = query_start_loc.data_ptr<int32_t>();
    for (int64_t r = 0; r + 1 < query_start_loc.size(0); ++r)
      TORCH_CHECK(qsl[r + 1] - qsl[r] <= ancestor_bits.size(1) * 32,
                  "a request has more new tokens than ancestor_bits has bits");
  }
#define LONGSPEC_SPEC_MERGE(D)                                                              \
  switch (query.scalar_type()) {                                                            \
    case at::kFloat:                                                                        \
      return spec_merge<D, float>(query, key, value, query_start_loc, ancestor_bits, scale, \
                                  out, lse);                                                \
    case at::kBFloat16:                                                                     \
      return spec_merge<D, at::BFloat16>(query, key, value, query_start_loc, ancestor_bits, \
                                         scale, out, lse);                                  \
    case at::kHalf:                                                                         \
      return spec_merge<D, at::Half>(query, key, value, query_start_loc, ancestor_bits,     \
                                     scale, out, lse);                                      \
    default:                                                                                \
      TORCH_CHECK(false, "merge_spec_attention: unsupported dtype ", query.scalar_type());  \
  }
  switch (query.size(2)) {
    case 64:
      LONGSPEC_SPEC_MERGE(64)
    case 128:
      LONGSPEC_SPEC_MERGE(128)
    default:
      TORCH_CHECK(false, "merge_spec_attention: head size ", query.size(2), " not compiled");
  }
#undef LONGSPEC_SPEC_MERGE
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_prefix_attention", &paged_prefix_attention,
        "Paged prefix attention with LSE over vLLM's CPU cache (vec packing)");
  m.def("merge_spec_attention", &merge_spec_attention,
        "Masked attention over the new tokens, merged into a prefix result in place");
}
