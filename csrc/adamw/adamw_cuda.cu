// CUDA kernel of steplaw::fused_adamw_: multi-tensor apply (csrc/common/multi_tensor.cuh),
// one block per 64Ki-element chunk (chunks cut at the member boundaries of a stacked
// param, so a block reads one hparams row; a frozen member's blocks return at once), 16-byte loads of fp32 (4 elements per thread and
// iteration) where every pointer of a chunk is aligned, a scalar loop otherwise, and the
// per-element math of adamw_math.h with round-to-nearest intrinsics.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <map>
#include <vector>

#include "adamw/adamw_common.h"
#include "adamw/adamw_math.h"
#include "common/cuda_kernel.h"
#include "common/multi_tensor.cuh"

namespace steplaw {
namespace adamw {
namespace {

constexpr int kThreads = 512;
constexpr int kIlp = 4;
enum List { kParam = 0, kGrad, kExpAvg, kExpAvgSq, kMaxExpAvgSq, kMaster, kNumLists };
using Table = mta::TensorTable<kNumLists>;
// Kernel arguments are limited to 32764 bytes (CUDA >= 12.1, sm_70+); the rest holds
// the other arguments.
static_assert(sizeof(Table) <= 32764 - 64, "multi-tensor table too large for a kernel argument");

// IEEE round-to-nearest operations that nvcc never contracts or approximates, even
// under --use_fast_math (setup.py does not pass it; a user's NVCC_FLAGS might).
struct CudaOps {
  static __device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
  static __device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
  static __device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
  static __device__ __forceinline__ float div(float a, float b) { return __fdiv_rn(a, b); }
  static __device__ __forceinline__ float fma(float a, float b, float c) { return __fmaf_rn(a, b, c); }
  static __device__ __forceinline__ float sqrt(float a) { return __fsqrt_rn(a); }
  static __device__ __forceinline__ float neg(float a) { return -a; }
  static __device__ __forceinline__ float max(float a, float b) { return (a < b) ? b : a; }
  static __device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }
  static __device__ __forceinline__ double sub(double a, double b) { return __dsub_rn(a, b); }
  static __device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
  static __device__ __forceinline__ double div(double a, double b) { return __ddiv_rn(a, b); }
  static __device__ __forceinline__ double fma(double a, double b, double c) { return __fma_rn(a, b, c); }
  static __device__ __forceinline__ double sqrt(double a) { return __dsqrt_rn(a); }
  static __device__ __forceinline__ double neg(double a) { return -a; }
  static __device__ __forceinline__ double max(double a, double b) { return (a < b) ? b : a; }
};

template <typename S>
struct alignas(sizeof(S) * kIlp) Pack {
  S v[kIlp];
};

template <typename S>
__device__ __forceinline__ bool aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(S) * kIlp) == 0;
}

template <typename param_t, typename T>
__device__ __forceinline__ void update_one(param_t* p, const param_t* g, T* m, T* v, T* vmax,
                                           float* master, int64_t d, const Coeffs<T>& c,
                                           bool has_scale, T scale) {
  T pv = master ? T(master[d]) : static_cast<T>(p[d]);
  T mv = m[d], vv = v[d];
  T vmaxv = vmax ? vmax[d] : T(0);
  update<CudaOps>(pv, static_cast<T>(g[d]), mv, vv, vmax ? &vmaxv : nullptr, c, has_scale, scale);
  m[d] = mv;
  v[d] = vv;
  if (vmax) vmax[d] = vmaxv;
  if (master) master[d] = float(pv);
  p[d] = static_cast<param_t>(pv);
}

template <typename param_t, typename T>
__global__ void __launch_bounds__(kThreads) adamw_kernel(
    const Table table, const double* __restrict__ hparams, const float* grad_scale,
    const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const int t = table.block_tensor[blockIdx.x];
  const mta::ChunkBounds bounds = mta::chunk_bounds(table.numel[t], table.segments[t], table.block_chunk[blockIdx.x]);
  const double* row = hparams + (table.tag[t] + bounds.segment) * kNumHparams;
  if (row_frozen(row)) return;
  const int64_t begin = bounds.begin;
  const int64_t end = bounds.end;
  const Coeffs<T> c = make_coeffs<T>(row, double(*table.scalar[t]) + 1.0);
  const bool has_scale = grad_scale != nullptr;
  const T scale = has_scale ? T(*grad_scale) : T(1);
  param_t* p = static_cast<param_t*>(table.ptr[kParam][t]);
  const param_t* g = static_cast<const param_t*>(table.ptr[kGrad][t]);
  T* m = static_cast<T*>(table.ptr[kExpAvg][t]);
  T* v = static_cast<T*>(table.ptr[kExpAvgSq][t]);
  T* vmax = static_cast<T*>(table.ptr[kMaxExpAvgSq][t]);
  float* master = static_cast<float*>(table.ptr[kMaster][t]);

  const bool vectorizable = aligned<param_t>(p + begin) && aligned<param_t>(g + begin) &&
      aligned<T>(m + begin) && aligned<T>(v + begin) &&
      (vmax == nullptr || aligned<T>(vmax + begin)) &&
      (master == nullptr || aligned<float>(master + begin));
  int64_t d = begin;
  if (vectorizable) {
    const int64_t n_packs = (end - begin) / kIlp;
    for (int64_t k = threadIdx.x; k < n_packs; k += blockDim.x) {
      const int64_t at = begin + k * kIlp;
      Pack<param_t> pp = *reinterpret_cast<const Pack<param_t>*>(p + at);
      const Pack<param_t> gp = *reinterpret_cast<const Pack<param_t>*>(g + at);
      Pack<T> mp = *reinterpret_cast<const Pack<T>*>(m + at);
      Pack<T> vp = *reinterpret_cast<const Pack<T>*>(v + at);
      Pack<T> vmaxp;
      Pack<float> masterp;
      if (vmax) vmaxp = *reinterpret_cast<const Pack<T>*>(vmax + at);
      if (master) masterp = *reinterpret_cast<const Pack<float>*>(master + at);
#pragma unroll
      for (int e = 0; e < kIlp; ++e) {
        T pv = master ? T(masterp.v[e]) : static_cast<T>(pp.v[e]);
        update<CudaOps>(pv, static_cast<T>(gp.v[e]), mp.v[e], vp.v[e],
                        vmax ? &vmaxp.v[e] : nullptr, c, has_scale, scale);
        if (master) masterp.v[e] = float(pv);
        pp.v[e] = static_cast<param_t>(pv);
      }
      *reinterpret_cast<Pack<T>*>(m + at) = mp;
      *reinterpret_cast<Pack<T>*>(v + at) = vp;
      if (vmax) *reinterpret_cast<Pack<T>*>(vmax + at) = vmaxp;
      if (master) *reinterpret_cast<Pack<float>*>(master + at) = masterp;
      *reinterpret_cast<Pack<param_t>*>(p + at) = pp;
    }
    d = begin + n_packs * kIlp;
  }
  for (int64_t k = d + threadIdx.x; k < end; k += blockDim.x) {
    update_one<param_t, T>(p, g, m, v, vmax, master, k, c, has_scale, scale);
  }
}

template <typename param_t, typename T>
void launch_bucket(const std::vector<const ParamSlot*>& slots, const std::vector<const at::Tensor*>& steps,
                   const at::Tensor& hparams, const float* grad_scale, const float* found_inf) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  mta::for_each_table<kNumLists>(
      int(slots.size()),
      [&](int i, Table& table, int slot) {
        const ParamSlot& s = *slots[i];
        table.ptr[kParam][slot] = s.param.data_ptr();
        table.ptr[kGrad][slot] = const_cast<void*>(s.grad.const_data_ptr());
        table.ptr[kExpAvg][slot] = s.exp_avg.data_ptr();
        table.ptr[kExpAvgSq][slot] = s.exp_avg_sq.data_ptr();
        table.ptr[kMaxExpAvgSq][slot] = s.max_exp_avg_sq.defined() ? s.max_exp_avg_sq.data_ptr() : nullptr;
        table.ptr[kMaster][slot] = s.master.defined() ? s.master.data_ptr() : nullptr;
        table.numel[slot] = s.param.numel();
        table.tag[slot] = int32_t(s.group);
        table.segments[slot] = int32_t(s.members);
        table.scalar[slot] = steps[i]->const_data_ptr<float>();
      },
      [&](int i) { return mta::chunk_count(slots[i]->param.numel(), slots[i]->members); },
      [&](const Table& table, int n_blocks) {
        STEPLAW_LAUNCH((n_blocks, kThreads, 0, stream), adamw_kernel<param_t, T>)(
            table, hparams.const_data_ptr<double>(), grad_scale, found_inf);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

void fused_adamw_cuda(
    at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList master_params,
    at::TensorList steps, const at::Tensor& hparams, at::IntArrayRef group_index, bool amsgrad,
    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
    at::OptionalIntArrayRef members) {
  if (params.empty()) return;
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  STEPLAW_CHECK(hparams.device() == device, "fused_adamw_ expects hparams on ", device,
                ", got ", hparams.device());
  for (const auto& t : params) {
    STEPLAW_CHECK(t.device() == device, "fused_adamw_ expects all params on one device, got ",
                  device, " and ", t.device());
  }
  auto scalar_ptr = [&](const std::optional<at::Tensor>& t, const char* name) -> const float* {
    if (!t.has_value() || !t->defined()) return nullptr;
    STEPLAW_CHECK(t->device() == device && t->scalar_type() == at::kFloat && t->numel() == 1,
                  name, " must be a one-element float32 tensor on ", device);
    return t->const_data_ptr<float>();
  };
  const float* scale_ptr = scalar_ptr(grad_scale, "grad_scale");
  const float* found_inf_ptr = scalar_ptr(found_inf, "found_inf");

  StagedLists staged = stage_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                   master_params, steps, hparams, group_index, amsgrad, members);
  // One launch sequence per parameter dtype (mixed dtypes in a group are allowed).
  std::map<at::ScalarType, std::pair<std::vector<const ParamSlot*>, std::vector<const at::Tensor*>>> buckets;
  for (size_t i = 0; i < staged.slots.size(); ++i) {
    auto& bucket = buckets[staged.slots[i].param.scalar_type()];
    bucket.first.push_back(&staged.slots[i]);
    bucket.second.push_back(&steps[i]);
  }
  for (auto& [type, bucket] : buckets) {
    switch (type) {
      case at::kFloat:
        launch_bucket<float, float>(bucket.first, bucket.second, hparams, scale_ptr, found_inf_ptr);
        break;
      case at::kDouble:
        launch_bucket<double, double>(bucket.first, bucket.second, hparams, scale_ptr, found_inf_ptr);
        break;
      case at::kBFloat16:
        launch_bucket<at::BFloat16, float>(bucket.first, bucket.second, hparams, scale_ptr, found_inf_ptr);
        break;
      case at::kHalf:
        launch_bucket<at::Half, float>(bucket.first, bucket.second, hparams, scale_ptr, found_inf_ptr);
        break;
      default:
        STEPLAW_CHECK(false, "fused_adamw_ supports float32, float64, bfloat16 and float16 params, got ", dtype_name(type));
    }
  }
  staged.finish();
  // The steps advance after the kernels read them; not at all when found_inf is set.
  std::vector<at::Tensor> step_list(steps.begin(), steps.end());
  if (found_inf_ptr != nullptr) {
    at::_foreach_add_(step_list, 1.0 - (*found_inf != 0).to(at::kFloat).reshape({}));
  } else {
    at::_foreach_add_(step_list, 1.0);
  }
}

}  // namespace
}  // namespace adamw
}  // namespace steplaw

STEPLAW_CUDA_LIBRARY_IMPL(m) {
  m.impl("fused_adamw_", &steplaw::adamw::fused_adamw_cuda);
}
