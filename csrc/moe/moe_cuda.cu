// CUDA kernels of the MoE dispatch ops (schemas in csrc/steplaw.cpp, semantics in
// steplaw/ops/moe.py, shared counting/index math in moe_index.h).
//
// Sorting by expert is a stable counting sort in three small kernels: per-chunk expert
// histograms (shared-memory integer atomics), a prefix sum over chunks and experts, and
// a rank pass in which one warp walks its chunk 32 slots at a time (__match_any_sync
// finds the lanes with the same expert), so ranks follow slot order exactly. Then the
// data kernels move rows with 16-byte vector loads and stores, one token per block.
// Nothing reads a count back to the host; every output size follows from the shapes.
//
// Determinism: integer atomics only (their sums do not depend on order); every float
// output element is computed by one thread in a fixed order, the weight gradients by a
// fixed-shape block reduction. There is no non-deterministic path.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <tuple>

#include "common/cuda_kernel.h"
#include "moe/moe_checks.h"
#include "moe/moe_index.h"

namespace steplaw {
namespace moe {
namespace {

constexpr int64_t kMaxExpertsCuda = 4096;  // shared memory: E * 8 bytes in the scan
constexpr int64_t kMaxTopKCuda = 2048;     // a token's rows and weights staged in shared memory
constexpr int kWarp = 32;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- routing ----------------------------------------------------------------------------

template <typename scalar_t, typename score_t>
__global__ void route_kernel(const scalar_t* __restrict__ logits, int64_t tokens, int32_t experts, int32_t k,
                             bool use_sigmoid, bool renormalize, const score_t* __restrict__ bias,
                             int32_t* __restrict__ ids, score_t* __restrict__ weights) {
  STEPLAW_DYNAMIC_SHARED(unsigned char, route_smem);
  score_t* top_val = reinterpret_cast<score_t*>(route_smem) + threadIdx.x * k;
  int32_t* top_idx = reinterpret_cast<int32_t*>(reinterpret_cast<score_t*>(route_smem) + blockDim.x * k) +
                     threadIdx.x * k;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  route_token<score_t, scalar_t>(logits + t * experts, experts, k, use_sigmoid, renormalize, bias, top_val, top_idx,
                                 ids + t * k, weights + t * k);
}

// counts[e] += number of the n ids equal to e (ids outside [0, E) trip an assert).
__global__ void histogram_kernel(const int32_t* __restrict__ ids, int64_t n, int32_t experts,
                                 int64_t* __restrict__ counts) {
  STEPLAW_DYNAMIC_SHARED(int, hist_smem);
  for (int e = threadIdx.x; e < experts; e += blockDim.x) hist_smem[e] = 0;
  __syncthreads();
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t e = ids[i];
    CUDA_KERNEL_ASSERT(e >= 0 && e < experts && "expert id out of range");
    if (e >= 0 && e < experts) atomicAdd(&hist_smem[e], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < experts; e += blockDim.x) {
    if (hist_smem[e]) atomicAdd(reinterpret_cast<unsigned long long*>(counts + e),
                                static_cast<unsigned long long>(hist_smem[e]));
  }
}

// ---- counting sort by expert ---------------------------------------------------------------

// chunk_counts[c * E + e] = slots of chunk c that chose expert e.
__global__ void count_chunks_kernel(const int32_t* __restrict__ ids, int64_t slots, int64_t chunk, int32_t experts,
                                    int32_t* __restrict__ chunk_counts) {
  STEPLAW_DYNAMIC_SHARED(int, count_smem);
  for (int e = threadIdx.x; e < experts; e += blockDim.x) count_smem[e] = 0;
  __syncthreads();
  const int64_t start = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t stop = min(slots, start + chunk);
  for (int64_t i = start + threadIdx.x; i < stop; i += blockDim.x) {
    const int32_t e = ids[i];
    CUDA_KERNEL_ASSERT(e >= 0 && e < experts && "expert id out of range");
    if (e >= 0 && e < experts) atomicAdd(&count_smem[e], 1);
  }
  __syncthreads();
  int32_t* out = chunk_counts + static_cast<int64_t>(blockIdx.x) * experts;
  for (int e = threadIdx.x; e < experts; e += blockDim.x) out[e] = count_smem[e];
}

// In place: chunk_counts[c * E + e] -> rank of chunk c's first slot among expert e's
// slots. Writes offsets [E+1] and the dropped-slot count. One block.
__global__ void scan_chunks_kernel(int32_t* __restrict__ chunk_counts, int64_t chunks, int32_t experts,
                                   int64_t pad_multiple, int64_t capacity, int64_t* __restrict__ offsets,
                                   int64_t* __restrict__ dropped) {
  STEPLAW_DYNAMIC_SHARED(int64_t, total_smem);
  constexpr int kBatch = 16;  // loads in flight per thread: the walk over chunks is latency bound
  for (int e = threadIdx.x; e < experts; e += blockDim.x) {
    int64_t running = 0;
    for (int64_t c0 = 0; c0 < chunks; c0 += kBatch) {
      int32_t n[kBatch];
#pragma unroll
      for (int q = 0; q < kBatch; ++q) n[q] = c0 + q < chunks ? chunk_counts[(c0 + q) * experts + e] : 0;
#pragma unroll
      for (int q = 0; q < kBatch; ++q) {
        if (c0 + q < chunks) chunk_counts[(c0 + q) * experts + e] = static_cast<int32_t>(running);
        running += n[q];
      }
    }
    total_smem[e] = running;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t offset = 0, drops = 0;
    offsets[0] = 0;
    for (int e = 0; e < experts; ++e) {
      offset += group_rows(total_smem[e], pad_multiple, capacity);
      offsets[e + 1] = offset;
      drops += dropped_slots(total_smem[e], capacity);
    }
    *dropped = drops;
  }
}

// One warp per chunk hands out ranks in slot order: row_map[i] and src_index[row].
__global__ void assign_rows_kernel(const int32_t* __restrict__ ids, int64_t slots, int64_t chunk, int32_t experts,
                                   int64_t capacity, const int32_t* __restrict__ chunk_base,
                                   const int64_t* __restrict__ offsets, int64_t* __restrict__ row_map,
                                   int64_t* __restrict__ src_index) {
  STEPLAW_DYNAMIC_SHARED(int, next_rank);
  const int lane = threadIdx.x;
  const int32_t* base = chunk_base + static_cast<int64_t>(blockIdx.x) * experts;
  for (int e = lane; e < experts; e += kWarp) next_rank[e] = base[e];
  __syncwarp();
  const int64_t start = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t stop = min(slots, start + chunk);
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int64_t first = start; first < stop; first += kWarp) {
    const int64_t i = first + lane;
    const int32_t e = i < stop ? ids[i] : -1;
    const bool ok = e >= 0 && e < experts;
    const int key = ok ? e : -1 - lane;  // lanes without a valid expert match only themselves
    const unsigned peers = __match_any_sync(0xffffffffu, key);
    const int before = __popc(peers & lanes_below);
    const int rank_base = ok ? next_rank[e] : 0;
    __syncwarp();
    if (ok && before == 0) next_rank[e] = rank_base + __popc(peers);
    __syncwarp();
    if (ok) {
      const int64_t row = slot_row(offsets[e], static_cast<int64_t>(rank_base) + before, capacity);
      row_map[i] = row;
      if (row >= 0) src_index[row] = i;
    }
  }
}

// ---- data movement ---------------------------------------------------------------------------

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Widest access (bytes) dividing the row size and every pointer's alignment.
int pick_access_bytes(int64_t row_bytes, std::initializer_list<const void*> ptrs) {
  for (int bytes : {16, 8, 4, 2}) {
    bool fits = row_bytes % bytes == 0;
    for (const void* p : ptrs) fits = fits && reinterpret_cast<uintptr_t>(p) % bytes == 0;
    if (fits) return bytes;
  }
  return 1;
}

int threads_for(int64_t vectors) {
  return static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(kWarp, ceil_div(vectors, kWarp) * kWarp)));
}

// Each token's row is read once and written to its k rows (dropped slots skipped).
template <typename V>
__global__ void scatter_tokens_kernel(const V* __restrict__ x, V* __restrict__ out, const int64_t* __restrict__ row_map,
                                      int32_t k, int64_t vectors) {
  STEPLAW_DYNAMIC_SHARED(int64_t, scatter_rows);
  const int64_t t = blockIdx.x;
  for (int j = threadIdx.x; j < k; j += blockDim.x) scatter_rows[j] = row_map[t * k + j];
  __syncthreads();
  for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
    const V value = x[t * vectors + v];
    for (int j = 0; j < k; ++j) {
      const int64_t row = scatter_rows[j];
      if (row >= 0) out[row * vectors + v] = value;
    }
  }
}

// Zeroes the rows no slot maps to (src_index -1): padding, unused capacity, the tail.
template <typename V>
__global__ void zero_free_rows_kernel(V* __restrict__ out, const int64_t* __restrict__ src_index, int64_t rows,
                                      int64_t vectors) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    if (src_index[r] >= 0) continue;
    const V zero{};
    for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) out[r * vectors + v] = zero;
  }
}

template <typename V>
void launch_zero_free_rows(void* out, const int64_t* src_index, int64_t rows, int64_t row_bytes, cudaStream_t stream) {
  const int64_t vectors = row_bytes / static_cast<int64_t>(sizeof(V));
  const int64_t blocks = std::min<int64_t>(rows, 16384);
  STEPLAW_LAUNCH((blocks, threads_for(vectors), 0, stream), zero_free_rows_kernel<V>)(static_cast<V*>(out), src_index, rows, vectors);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void zero_free_rows(at::Tensor& out, const at::Tensor& src_index, cudaStream_t stream) {
  const int64_t rows = out.size(0);
  const int64_t row_bytes = out.size(1) * static_cast<int64_t>(out.element_size());
  if (rows == 0 || row_bytes == 0) return;
  switch (pick_access_bytes(row_bytes, {out.data_ptr()})) {
    case 16: return launch_zero_free_rows<uint4>(out.data_ptr(), src_index.data_ptr<int64_t>(), rows, row_bytes, stream);
    case 8: return launch_zero_free_rows<uint2>(out.data_ptr(), src_index.data_ptr<int64_t>(), rows, row_bytes, stream);
    case 4: return launch_zero_free_rows<uint32_t>(out.data_ptr(), src_index.data_ptr<int64_t>(), rows, row_bytes, stream);
    case 2: return launch_zero_free_rows<uint16_t>(out.data_ptr(), src_index.data_ptr<int64_t>(), rows, row_bytes, stream);
    default: return launch_zero_free_rows<uint8_t>(out.data_ptr(), src_index.data_ptr<int64_t>(), rows, row_bytes, stream);
  }
}

template <typename V>
void launch_scatter(const at::Tensor& x, at::Tensor& out, const at::Tensor& row_map, int64_t row_bytes,
                    cudaStream_t stream) {
  const int64_t vectors = row_bytes / static_cast<int64_t>(sizeof(V));
  const int32_t k = static_cast<int32_t>(row_map.size(1));
  STEPLAW_LAUNCH((x.size(0), threads_for(vectors), k * sizeof(int64_t), stream), scatter_tokens_kernel<V>)(
      static_cast<const V*>(x.data_ptr()), static_cast<V*>(out.data_ptr()), row_map.data_ptr<int64_t>(), k, vectors);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out[t] = sum_j w[t, j] * y[row_map[t, j]] (w = 1 without weights), fp32/fp64 accumulation
// in slot order; VEC elements per access.
template <typename scalar_t, int VEC>
__global__ void combine_kernel(const scalar_t* __restrict__ y, const int64_t* __restrict__ row_map,
                               const at::opmath_type<scalar_t>* __restrict__ weights, scalar_t* __restrict__ out,
                               int32_t k, int64_t hidden, int64_t y_rows) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  STEPLAW_DYNAMIC_SHARED(int64_t, combine_smem);
  int64_t* rows = combine_smem;
  acc_t* w = reinterpret_cast<acc_t*>(combine_smem + k);
  const int64_t t = blockIdx.x;
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    int64_t row = row_map[t * k + j];
    // The CPU kernel raises on a row past y's end; here it trips an assert and is skipped
    // rather than read out of bounds.
    CUDA_KERNEL_ASSERT(row < y_rows && "row map holds a row past the permuted tensor");
    if (row >= y_rows) row = -1;
    rows[j] = row;
    w[j] = weights ? weights[t * k + j] : acc_t(1);
  }
  __syncthreads();
  const int64_t vectors = hidden / VEC;
  for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
    acc_t acc[VEC];
#pragma unroll
    for (int q = 0; q < VEC; ++q) acc[q] = acc_t(0);
    for (int j = 0; j < k; ++j) {
      const int64_t row = rows[j];
      if (row < 0) continue;
      const P p = reinterpret_cast<const P*>(y + row * hidden)[v];
#pragma unroll
      for (int q = 0; q < VEC; ++q) acc[q] = mul_add_unfused(w[j], static_cast<acc_t>(p.v[q]), acc[q]);
    }
    P result;
#pragma unroll
    for (int q = 0; q < VEC; ++q) result.v[q] = static_cast<scalar_t>(acc[q]);
    reinterpret_cast<P*>(out + t * hidden)[v] = result;
  }
}

template <typename acc_t>
__device__ acc_t block_sum(acc_t value, acc_t* scratch) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  acc_t total = acc_t(0);
  if (threadIdx.x == 0) {
    for (int i = 0; i < static_cast<int>(blockDim.x / kWarp); ++i) total += scratch[i];
  }
  __syncthreads();
  return total;  // valid in thread 0
}

// Per token: grad_y[row_map[t, j]] = w[t, j] * g[t]; grad_w[t, j] = <g[t], y[row_map[t, j]]>.
template <typename scalar_t, int VEC>
__global__ void unpermute_backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ y,
                                          const int64_t* __restrict__ row_map,
                                          const at::opmath_type<scalar_t>* __restrict__ weights,
                                          scalar_t* __restrict__ grad_y, at::opmath_type<scalar_t>* __restrict__ grad_w,
                                          int32_t k, int64_t hidden, int64_t y_rows) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  __shared__ acc_t scratch[256 / kWarp];
  const int64_t t = blockIdx.x;
  const int64_t vectors = hidden / VEC;
  const P* g = reinterpret_cast<const P*>(grad_out + t * hidden);
  for (int j = 0; j < k; ++j) {
    const int64_t row = row_map[t * k + j];  // the same for the whole block: uniform branch
    if (row < 0 || row >= y_rows) {  // as the CPU kernel: no slot, or a row past y's end
      if (threadIdx.x == 0) grad_w[t * k + j] = acc_t(0);
      continue;
    }
    const acc_t w = weights[t * k + j];
    const P* yr = reinterpret_cast<const P*>(y + row * hidden);
    P* gy = reinterpret_cast<P*>(grad_y + row * hidden);
    acc_t dot = acc_t(0);
    for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
      const P gp = g[v];
      const P yp = yr[v];
      P out;
#pragma unroll
      for (int q = 0; q < VEC; ++q) {
        const acc_t gq = static_cast<acc_t>(gp.v[q]);
        dot += gq * static_cast<acc_t>(yp.v[q]);
        out.v[q] = static_cast<scalar_t>(gq * w);
      }
      gy[v] = out;
    }
    const acc_t total = block_sum(dot, scratch);
    if (threadIdx.x == 0) grad_w[t * k + j] = total;
  }
}

template <typename scalar_t>
int vector_width(int64_t hidden, std::initializer_list<const void*> ptrs) {
  const int bytes = pick_access_bytes(hidden * static_cast<int64_t>(sizeof(scalar_t)), ptrs);
  return std::max<int>(1, bytes / static_cast<int>(sizeof(scalar_t)));
}

// Calls launch(std::integral_constant<int, V>) with V the widest of 8/4/2/1 within `vec`.
template <typename Launch>
void with_vector_width(int vec, Launch&& launch) {
  if (vec >= 8) launch(std::integral_constant<int, 8>());
  else if (vec >= 4) launch(std::integral_constant<int, 4>());
  else if (vec >= 2) launch(std::integral_constant<int, 2>());
  else launch(std::integral_constant<int, 1>());
}

// ---- ops ------------------------------------------------------------------------------------

// Outputs (expert_ids, weights, counts), as the wrapper moe_route returns them.
std::tuple<at::Tensor, at::Tensor, at::Tensor> route_cuda(const at::Tensor& logits_in, int64_t k,
                                                           c10::string_view score_func, bool renormalize,
                                                           const std::optional<at::Tensor>& bias_in) {
  check_route_args(logits_in, k, bias_in);
  const bool use_sigmoid = parse_score_func(std::string_view(score_func.data(), score_func.size()));
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const int64_t tokens = logits.size(0);
  const int32_t experts = static_cast<int32_t>(logits.size(1));
  STEPLAW_CHECK(experts <= kMaxExpertsCuda, "number of experts ", experts, ": the CUDA kernels take at most ",
              kMaxExpertsCuda);
  STEPLAW_CHECK(k <= kMaxTopKCuda, "top_k=", k, ": the CUDA kernels take at most ", kMaxTopKCuda);
  const auto weight_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor ids = at::empty({tokens, k}, logits.options().dtype(at::kInt));
  at::Tensor weights = at::empty({tokens, k}, logits.options().dtype(weight_dtype));
  at::Tensor counts = at::zeros({experts}, logits.options().dtype(at::kLong));
  if (tokens == 0) return {ids, weights, counts};
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->to(weight_dtype).contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "moe_route_cuda", [&] {
    using score_t = at::opmath_type<scalar_t>;
    const int64_t per_thread = k * static_cast<int64_t>(sizeof(score_t) + sizeof(int32_t));
    int64_t threads = std::min<int64_t>(128, std::max<int64_t>(1, 32768 / per_thread));
    if (threads >= kWarp) threads = threads / kWarp * kWarp;
    STEPLAW_LAUNCH((ceil_div(tokens, threads), threads, threads * per_thread, stream), route_kernel<scalar_t, score_t>)(
        logits.data_ptr<scalar_t>(), tokens, experts, static_cast<int32_t>(k), use_sigmoid, renormalize,
        bias.defined() ? bias.data_ptr<score_t>() : nullptr, ids.data_ptr<int32_t>(), weights.data_ptr<score_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const int64_t slots = tokens * k;
  const int64_t blocks = std::min<int64_t>(ceil_div(slots, 256), 1024);
  STEPLAW_LAUNCH((blocks, 256, experts * sizeof(int), stream), histogram_kernel)(ids.data_ptr<int32_t>(), slots, experts,
                                                                   counts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {ids, weights, counts};
}

PermuteOutputs permute_cuda(const at::Tensor& x_in, const at::Tensor& ids_in, int64_t experts, int64_t pad_multiple,
                            int64_t capacity) {
  check_permute_args(x_in, ids_in, experts, pad_multiple, capacity);
  STEPLAW_CHECK(experts <= kMaxExpertsCuda, "num_experts=", experts, ": the CUDA kernels take at most ",
              kMaxExpertsCuda);
  STEPLAW_CHECK(ids_in.size(1) <= kMaxTopKCuda, "top_k=", ids_in.size(1), ": the CUDA kernels take at most ",
              kMaxTopKCuda);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  // int64 ids: out-of-range values become -1 before the cast (never wrapped into range:
  // 2^32 + 1 must not read as expert 1), so the counting kernels' assert rejects them.
  const at::Tensor ids = ids_in.scalar_type() == at::kInt
      ? ids_in.contiguous()
      : at::where(ids_in.ge(0).logical_and(ids_in.lt(experts)), ids_in, -1).to(at::kInt).contiguous();
  const int64_t tokens = x.size(0), hidden = x.size(1), k = ids.size(1);
  const int64_t slots = tokens * k;
  STEPLAW_CHECK(slots < INT32_MAX, "tokens * top_k = ", slots, ": expected fewer than 2^31 slots");
  const int64_t rows = permuted_rows(tokens, k, experts, pad_multiple, capacity);
  const bool has_free_rows = pad_multiple > 1 || capacity > 0;
  const auto long_opts = x.options().dtype(at::kLong);
  at::Tensor permuted = at::empty({rows, hidden}, x.options());
  at::Tensor row_map = at::empty({tokens, k}, long_opts);
  // Dropless and unpadded, every row receives a slot; otherwise free rows stay -1.
  at::Tensor src_index = has_free_rows ? at::full({rows}, -1, long_opts) : at::empty({rows}, long_opts);
  at::Tensor offsets = at::empty({experts + 1}, long_opts);
  at::Tensor dropped = at::empty({}, long_opts);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int32_t e32 = static_cast<int32_t>(experts);

  // At most 1024 chunks keep the serial scan over chunks short.
  const int64_t chunk = kCountChunk * std::max<int64_t>(1, ceil_div(slots, kCountChunk * 1024));
  const int64_t chunks = ceil_div(slots, chunk);
  at::Tensor chunk_counts = at::empty({std::max<int64_t>(chunks, 1) * experts}, x.options().dtype(at::kInt));
  if (chunks > 0) {
    STEPLAW_LAUNCH((chunks, 256, experts * sizeof(int), stream), count_chunks_kernel)(ids.data_ptr<int32_t>(), slots, chunk, e32,
                                                                        chunk_counts.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  STEPLAW_LAUNCH((1, 1024, experts * sizeof(int64_t), stream), scan_chunks_kernel)(chunk_counts.data_ptr<int32_t>(), chunks, e32,
                                                                     pad_multiple, capacity,
                                                                     offsets.data_ptr<int64_t>(),
                                                                     dropped.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (chunks > 0) {
    STEPLAW_LAUNCH((chunks, kWarp, experts * sizeof(int), stream), assign_rows_kernel)(
        ids.data_ptr<int32_t>(), slots, chunk, e32, capacity, chunk_counts.data_ptr<int32_t>(),
        offsets.data_ptr<int64_t>(), row_map.data_ptr<int64_t>(), src_index.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t row_bytes = hidden * static_cast<int64_t>(x.element_size());
  if (tokens > 0 && row_bytes > 0) {
    switch (pick_access_bytes(row_bytes, {x.data_ptr(), permuted.data_ptr()})) {
      case 16: launch_scatter<uint4>(x, permuted, row_map, row_bytes, stream); break;
      case 8: launch_scatter<uint2>(x, permuted, row_map, row_bytes, stream); break;
      case 4: launch_scatter<uint32_t>(x, permuted, row_map, row_bytes, stream); break;
      case 2: launch_scatter<uint16_t>(x, permuted, row_map, row_bytes, stream); break;
      default: launch_scatter<uint8_t>(x, permuted, row_map, row_bytes, stream); break;
    }
  }
  if (has_free_rows) zero_free_rows(permuted, src_index, stream);
  return {permuted, row_map, src_index, offsets, dropped};
}

at::Tensor combine_cuda(const at::Tensor& y_in, const at::Tensor& row_map_in, const at::Tensor& weights_in) {
  const c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor y = y_in.contiguous();
  const at::Tensor row_map = row_map_in.contiguous();
  const int64_t tokens = row_map.size(0), k = row_map.size(1), hidden = y.size(1);
  STEPLAW_CHECK(k <= kMaxTopKCuda, "top_k=", k, ": the CUDA kernels take at most ", kMaxTopKCuda);
  STEPLAW_CHECK(tokens < INT32_MAX, "row map of ", tokens, " tokens: the CUDA kernels take fewer than 2^31");  // grid.x
  at::Tensor out = at::empty({tokens, hidden}, y.options());
  if (tokens == 0 || hidden == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "moe_combine_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor weights;
    if (weights_in.defined()) weights = weights_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* w_ptr = weights.defined() ? weights.data_ptr<acc_t>() : nullptr;
    const size_t smem = k * (sizeof(int64_t) + sizeof(acc_t));
    const int vec = vector_width<scalar_t>(hidden, {y.data_ptr(), out.data_ptr()});
    const int threads = threads_for(hidden / vec);
    auto launch = [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      STEPLAW_LAUNCH((tokens, threads, smem, stream), combine_kernel<scalar_t, V>)(
          y.data_ptr<scalar_t>(), row_map.data_ptr<int64_t>(), w_ptr, out.data_ptr<scalar_t>(),
          static_cast<int32_t>(k), hidden, y.size(0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    with_vector_width(vec, launch);
  });
  return out;
}

at::Tensor unpermute_cuda(const at::Tensor& y, const at::Tensor& row_map, const at::Tensor& src_index,
                          const at::Tensor& weights) {
  check_unpermute_args(y, row_map, src_index, weights);
  return combine_cuda(y, row_map, weights);
}

at::Tensor permute_backward_cuda(const at::Tensor& grad_permuted, const at::Tensor& row_map) {
  check_permute_backward_args(grad_permuted, row_map);
  return combine_cuda(grad_permuted, row_map, at::Tensor());
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cuda(const at::Tensor& grad_out_in, const at::Tensor& y_in,
                                                           const at::Tensor& row_map_in, const at::Tensor& src_in,
                                                           const at::Tensor& weights_in) {
  check_unpermute_backward_args(grad_out_in, y_in, row_map_in, src_in, weights_in);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor grad_out = grad_out_in.contiguous(), y = y_in.contiguous();
  const at::Tensor row_map = row_map_in.contiguous(), src_index = src_in.contiguous();
  const int64_t tokens = row_map.size(0), k = row_map.size(1), hidden = y.size(1);
  STEPLAW_CHECK(tokens < INT32_MAX, "row map of ", tokens, " tokens: the CUDA kernels take fewer than 2^31");  // grid.x
  at::Tensor grad_y = at::empty_like(y);
  at::Tensor grad_w;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "moe_unpermute_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor weights = weights_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    grad_w = at::empty({tokens, k}, weights.options());
    if (tokens > 0 && hidden > 0) {
      const int vec = vector_width<scalar_t>(hidden, {grad_out.data_ptr(), y.data_ptr(), grad_y.data_ptr()});
      const int threads = threads_for(hidden / vec);
      auto launch = [&](auto vec_tag) {
        constexpr int V = decltype(vec_tag)::value;
        STEPLAW_LAUNCH((tokens, threads, 0, stream), unpermute_backward_kernel<scalar_t, V>)(
            grad_out.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), row_map.data_ptr<int64_t>(),
            weights.data_ptr<acc_t>(), grad_y.data_ptr<scalar_t>(), grad_w.data_ptr<acc_t>(),
            static_cast<int32_t>(k), hidden, y.size(0));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      with_vector_width(vec, launch);
    } else if (tokens > 0) {
      grad_w.zero_();
    }
  });
  zero_free_rows(grad_y, src_index, stream);
  return {grad_y, grad_w.to(weights_in.scalar_type())};
}

}  // namespace

STEPLAW_CUDA_LIBRARY_IMPL(m) {
  m.impl("moe_route", &route_cuda);
  m.impl("moe_permute", &permute_cuda);
  m.impl("moe_permute_backward", &permute_backward_cuda);
  m.impl("moe_unpermute", &unpermute_cuda);
  m.impl("moe_unpermute_backward", &unpermute_backward_cuda);
}

}  // namespace moe
}  // namespace steplaw
