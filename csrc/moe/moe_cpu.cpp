// C++ CPU kernels of the MoE dispatch ops (schemas in csrc/steplaw.cpp, semantics in
// steplaw/ops/moe.py). Parallel over tokens (or counting chunks) with at::parallel_for;
// every output element is written by exactly one iteration, so results do not depend
// on the thread count.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "moe/moe_checks.h"
#include "moe/moe_index.h"

namespace steplaw {
namespace moe {
namespace {

// Counting is cheap (a few ns per slot): below this many chunks a parallel region costs
// more than it saves, above all on a loaded machine.
constexpr int64_t kSerialChunks = 32;

// Outputs (expert_ids, weights, counts), as the wrapper moe_route returns them.
std::tuple<at::Tensor, at::Tensor, at::Tensor> route_cpu(const at::Tensor& logits_in, int64_t k,
                                                          c10::string_view score_func, bool renormalize,
                                                          const std::optional<at::Tensor>& bias_in) {
  check_route_args(logits_in, k, bias_in);
  const bool use_sigmoid = parse_score_func(std::string_view(score_func.data(), score_func.size()));
  const at::Tensor logits = logits_in.contiguous();
  const int64_t tokens = logits.size(0);
  const int32_t experts = static_cast<int32_t>(logits.size(1));
  const auto weight_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor ids = at::empty({tokens, k}, logits.options().dtype(at::kInt));
  at::Tensor weights = at::empty({tokens, k}, logits.options().dtype(weight_dtype));
  at::Tensor counts = at::zeros({experts}, logits.options().dtype(at::kLong));
  if (tokens == 0) return {ids, weights, counts};
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->to(weight_dtype).contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "moe_route_cpu", [&] {
    using score_t = at::opmath_type<scalar_t>;
    const scalar_t* logit_ptr = logits.data_ptr<scalar_t>();
    const score_t* bias_ptr = bias.defined() ? bias.data_ptr<score_t>() : nullptr;
    int32_t* ids_ptr = ids.data_ptr<int32_t>();
    score_t* weight_ptr = weights.data_ptr<score_t>();
    const int64_t grain = std::max<int64_t>(1, 4096 / experts);
    at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
      std::vector<score_t> top_val(k);
      std::vector<int32_t> top_idx(k);
      for (int64_t t = begin; t < end; ++t) {
        route_token<score_t, scalar_t>(logit_ptr + t * experts, experts, static_cast<int32_t>(k), use_sigmoid,
                                       renormalize, bias_ptr, top_val.data(), top_idx.data(), ids_ptr + t * k,
                                       weight_ptr + t * k);
      }
    });
  });
  int64_t* count_ptr = counts.data_ptr<int64_t>();
  const int32_t* ids_ptr = ids.data_ptr<int32_t>();
  for (int64_t i = 0; i < tokens * k; ++i) ++count_ptr[ids_ptr[i]];
  return {ids, weights, counts};
}

// ---- permute, in four steps --------------------------------------------------------------

// int32 ids for the counting passes. int64 ids are range-checked before the cast (a
// cast first would read 2^32 + 1 as expert 1); int32 ids are checked while counting.
at::Tensor int32_ids(const at::Tensor& ids, int64_t experts) {
  if (ids.scalar_type() == at::kInt) return ids.contiguous();
  const at::Tensor wide = ids.contiguous();
  const int64_t* ptr = wide.data_ptr<int64_t>();
  for (int64_t i = 0, n = wide.numel(); i < n; ++i) check_expert_id(ptr[i] >= 0 && ptr[i] < experts, ptr[i], experts);
  return wide.to(at::kInt);
}

// Step 1: per-chunk expert histograms of the T*k slots (chunks of kCountChunk slots),
// rejecting the first id outside [0, E) in slot order.
std::vector<int64_t> count_chunks(const int32_t* ids, int64_t slots, int64_t experts) {
  const int64_t chunks = (slots + kCountChunk - 1) / kCountChunk;
  std::vector<int64_t> chunk_counts(static_cast<size_t>(chunks * experts), 0);
  std::vector<int64_t> first_bad(static_cast<size_t>(chunks), -1);  // slot index, -1 if none
  at::parallel_for(0, chunks, kSerialChunks, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      int64_t* hist = chunk_counts.data() + c * experts;
      for (int64_t i = c * kCountChunk, stop = std::min(slots, (c + 1) * kCountChunk); i < stop; ++i) {
        const int64_t e = ids[i];
        if (e < 0 || e >= experts) {
          if (first_bad[c] < 0) first_bad[c] = i;
          continue;
        }
        ++hist[e];
      }
    }
  });
  for (int64_t bad : first_bad) {
    if (bad >= 0) check_expert_id(false, ids[bad], experts);
  }
  return chunk_counts;
}

// Step 2: prefix sums. Each chunk's histogram becomes its first rank per expert (in
// place); offsets [E+1] get the group starts; returns the slots dropped by the capacity.
int64_t scan_offsets(std::vector<int64_t>& chunk_counts, int64_t experts, int64_t pad_multiple, int64_t capacity,
                     int64_t* offsets) {
  const int64_t chunks = static_cast<int64_t>(chunk_counts.size()) / experts;
  std::vector<int64_t> running(static_cast<size_t>(experts), 0);
  for (int64_t c = 0; c < chunks; ++c) {
    int64_t* hist = chunk_counts.data() + c * experts;
    for (int64_t e = 0; e < experts; ++e) {
      const int64_t n = hist[e];
      hist[e] = running[e];
      running[e] += n;
    }
  }
  int64_t dropped = 0;
  offsets[0] = 0;
  for (int64_t e = 0; e < experts; ++e) {
    offsets[e + 1] = offsets[e] + group_rows(running[e], pad_multiple, capacity);
    dropped += dropped_slots(running[e], capacity);
  }
  return dropped;
}

// Step 3: ranks in slot order within each chunk -> row_map[slot] and src_index[row].
void assign_rows(const int32_t* ids, int64_t slots, int64_t experts, int64_t capacity,
                 std::vector<int64_t>& chunk_base, const int64_t* offsets, int64_t* row_map, int64_t* src_index) {
  const int64_t chunks = static_cast<int64_t>(chunk_base.size()) / experts;
  at::parallel_for(0, chunks, kSerialChunks, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      int64_t* next_rank = chunk_base.data() + c * experts;
      for (int64_t i = c * kCountChunk, stop = std::min(slots, (c + 1) * kCountChunk); i < stop; ++i) {
        const int64_t e = ids[i];
        const int64_t row = slot_row(offsets[e], next_rank[e]++, capacity);
        row_map[i] = row;
        if (row >= 0) src_index[row] = i;
      }
    }
  });
}

// Step 4: each token's row copied to its k rows (read once, written k times); the rows
// no slot landed in (padding, unused capacity, the tail of the upper bound) zeroed.
void copy_rows(const at::Tensor& x, at::Tensor& permuted, const int64_t* row_map, const int64_t* src_index,
               int64_t k, bool has_free_rows) {
  const int64_t tokens = x.size(0), rows = permuted.size(0);
  const int64_t row_bytes = x.size(1) * static_cast<int64_t>(x.element_size());
  if (row_bytes == 0) return;
  const char* x_bytes = static_cast<const char*>(x.data_ptr());
  char* out_bytes = static_cast<char*>(permuted.data_ptr());
  at::parallel_for(0, tokens, std::max<int64_t>(1, 65536 / (row_bytes * k + 1)), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t j = 0; j < k; ++j) {
        const int64_t row = row_map[t * k + j];
        if (row >= 0) std::memcpy(out_bytes + row * row_bytes, x_bytes + t * row_bytes, row_bytes);
      }
    }
  });
  if (!has_free_rows) return;
  at::parallel_for(0, rows, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (src_index[r] < 0) std::memset(out_bytes + r * row_bytes, 0, row_bytes);
    }
  });
}

PermuteOutputs permute_cpu(const at::Tensor& x_in, const at::Tensor& ids_in, int64_t experts, int64_t pad_multiple,
                           int64_t capacity) {
  check_permute_args(x_in, ids_in, experts, pad_multiple, capacity);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor ids = int32_ids(ids_in, experts);
  const int64_t tokens = x.size(0), hidden = x.size(1), k = ids.size(1);
  const int64_t slots = tokens * k;
  const int64_t rows = permuted_rows(tokens, k, experts, pad_multiple, capacity);
  const auto long_opts = x.options().dtype(at::kLong);
  at::Tensor permuted = at::empty({rows, hidden}, x.options());
  at::Tensor row_map = at::empty({tokens, k}, long_opts);
  at::Tensor src_index = at::full({rows}, -1, long_opts);
  at::Tensor offsets = at::empty({experts + 1}, long_opts);

  const int32_t* id_ptr = ids.data_ptr<int32_t>();
  std::vector<int64_t> chunk_counts = count_chunks(id_ptr, slots, experts);
  const int64_t dropped = scan_offsets(chunk_counts, experts, pad_multiple, capacity, offsets.data_ptr<int64_t>());
  assign_rows(id_ptr, slots, experts, capacity, chunk_counts, offsets.data_ptr<int64_t>(), row_map.data_ptr<int64_t>(),
              src_index.data_ptr<int64_t>());
  copy_rows(x, permuted, row_map.data_ptr<int64_t>(), src_index.data_ptr<int64_t>(), k,
            pad_multiple > 1 || capacity > 0);
  return {permuted, row_map, src_index, offsets, at::full({}, dropped, long_opts)};
}

// ---- unpermute and the backward ops --------------------------------------------------------

// out[t] = sum_j w[t, j] * y[row_map[t, j]] (w = 1 when weights is undefined), in slot
// order with fp32 (fp64) accumulation. Rows are checked against y's row count.
at::Tensor combine_cpu(const at::Tensor& y_in, const at::Tensor& row_map_in, const at::Tensor& weights_in) {
  const at::Tensor y = y_in.contiguous();
  const at::Tensor row_map = row_map_in.contiguous();
  const int64_t tokens = row_map.size(0), k = row_map.size(1), hidden = y.size(1), rows = y.size(0);
  at::Tensor out = at::empty({tokens, hidden}, y.options());
  if (tokens == 0 || hidden == 0) return out;
  const int64_t* row_ptr = row_map.data_ptr<int64_t>();
  std::vector<char> bad(static_cast<size_t>(at::get_num_threads()) + 1, 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "moe_combine_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor weights;
    if (weights_in.defined()) weights = weights_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* w_ptr = weights.defined() ? weights.data_ptr<acc_t>() : nullptr;
    const scalar_t* y_ptr = y.data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    at::parallel_for(0, tokens, std::max<int64_t>(1, 16384 / (hidden * k)), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(static_cast<size_t>(hidden));
      bool saw_bad = false;
      for (int64_t t = begin; t < end; ++t) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t j = 0; j < k; ++j) {
          const int64_t row = row_ptr[t * k + j];
          if (row < 0) continue;
          if (row >= rows) {
            saw_bad = true;
            continue;
          }
          const acc_t w = w_ptr ? w_ptr[t * k + j] : acc_t(1);
          const scalar_t* src = y_ptr + row * hidden;
          for (int64_t h = 0; h < hidden; ++h) acc[h] = mul_add_unfused(w, static_cast<acc_t>(src[h]), acc[h]);
        }
        scalar_t* dst = out_ptr + t * hidden;
        for (int64_t h = 0; h < hidden; ++h) dst[h] = static_cast<scalar_t>(acc[h]);
      }
      if (saw_bad) bad[static_cast<size_t>(at::get_thread_num())] = 1;
    });
  });
  for (char b : bad) check_row(!b, rows);
  return out;
}

at::Tensor unpermute_cpu(const at::Tensor& y, const at::Tensor& row_map, const at::Tensor& src_index,
                         const at::Tensor& weights) {
  check_unpermute_args(y, row_map, src_index, weights);
  return combine_cpu(y, row_map, weights);
}

at::Tensor permute_backward_cpu(const at::Tensor& grad_permuted, const at::Tensor& row_map) {
  check_permute_backward_args(grad_permuted, row_map);
  return combine_cpu(grad_permuted, row_map, at::Tensor());
}

// grad_y[row_map[t, j]] = w[t, j] * grad_out[t]; grad_w[t, j] = <grad_out[t], y[row_map[t, j]]>;
// rows no slot maps to (src_index -1) get zero gradient.
std::tuple<at::Tensor, at::Tensor> unpermute_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& y_in,
                                                          const at::Tensor& row_map_in, const at::Tensor& src_in,
                                                          const at::Tensor& weights_in) {
  check_unpermute_backward_args(grad_out_in, y_in, row_map_in, src_in, weights_in);
  const at::Tensor grad_out = grad_out_in.contiguous(), y = y_in.contiguous();
  const at::Tensor row_map = row_map_in.contiguous(), src_index = src_in.contiguous();
  const int64_t tokens = row_map.size(0), k = row_map.size(1), hidden = y.size(1), rows = y.size(0);
  at::Tensor grad_y = at::empty_like(y);
  at::Tensor grad_w;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "moe_unpermute_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor weights = weights_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    grad_w = at::empty({tokens, k}, weights.options());
    const acc_t* w_ptr = weights.data_ptr<acc_t>();
    acc_t* gw_ptr = grad_w.data_ptr<acc_t>();
    const scalar_t* g_ptr = grad_out.data_ptr<scalar_t>();
    const scalar_t* y_ptr = y.data_ptr<scalar_t>();
    scalar_t* gy_ptr = grad_y.data_ptr<scalar_t>();
    const int64_t* row_ptr = row_map.data_ptr<int64_t>();
    const int64_t* src_ptr = src_index.data_ptr<int64_t>();
    at::parallel_for(0, tokens, std::max<int64_t>(1, 16384 / (hidden * k + 1)), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* g = g_ptr + t * hidden;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t row = row_ptr[t * k + j];
          if (row < 0 || row >= rows) {
            gw_ptr[t * k + j] = acc_t(0);
            continue;
          }
          const acc_t w = w_ptr[t * k + j];
          const scalar_t* yr = y_ptr + row * hidden;
          scalar_t* gy = gy_ptr + row * hidden;
          // kLanes partial sums in a fixed order: vectorizable and still deterministic.
          constexpr int64_t kLanes = 8;
          acc_t partial[kLanes] = {};
          int64_t h = 0;
          for (; h + kLanes <= hidden; h += kLanes) {
            for (int64_t q = 0; q < kLanes; ++q) {
              const acc_t gh = static_cast<acc_t>(g[h + q]);
              partial[q] += gh * static_cast<acc_t>(yr[h + q]);
              gy[h + q] = static_cast<scalar_t>(gh * w);
            }
          }
          for (; h < hidden; ++h) {
            const acc_t gh = static_cast<acc_t>(g[h]);
            partial[h % kLanes] += gh * static_cast<acc_t>(yr[h]);
            gy[h] = static_cast<scalar_t>(gh * w);
          }
          acc_t dot = 0;
          for (int64_t q = 0; q < kLanes; ++q) dot += partial[q];
          gw_ptr[t * k + j] = dot;
        }
      }
    });
    at::parallel_for(0, rows, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        if (src_ptr[r] < 0) std::fill(gy_ptr + r * hidden, gy_ptr + (r + 1) * hidden, scalar_t(0));
      }
    });
  });
  return {grad_y, grad_w.to(weights_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(steplaw, CPU, m) {
  m.impl("moe_route", &route_cpu);
  m.impl("moe_permute", &permute_cpu);
  m.impl("moe_permute_backward", &permute_backward_cpu);
  m.impl("moe_unpermute", &unpermute_cpu);
  m.impl("moe_unpermute_backward", &unpermute_backward_cpu);
}

}  // namespace moe
}  // namespace steplaw
