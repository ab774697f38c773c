// C++ CPU kernel of steplaw::fused_adamw_: one parallel region over fixed-size chunks of
// all parameters (cut at member boundaries of stacked params, frozen members left out);
// each chunk runs the shared per-element math of adamw_math.h on AVX-512
// or AVX2 lanes (adamw_cpu_avx512.cpp / adamw_cpu_avx2.cpp, chosen at run time) or on
// scalars elsewhere.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include "adamw/adamw_common.h"
#include "adamw/adamw_cpu_range.h"
#include "adamw/adamw_math.h"

namespace steplaw {
namespace adamw {
namespace {

// Elements per parallel task (1 MiB of fp32 per array). Long contiguous runs keep the
// hardware prefetchers streaming: with 64 KiB tasks a 50M-parameter step ran at 68 GB/s
// on 2 cores, with 1 MiB tasks at 87 GB/s (bench/adamw.py, 2026-11-25); a 100-tensor
// model still splits into enough tasks to balance two threads.
constexpr int64_t kChunk = 1 << 18;
// Below this many elements in all, one thread does the whole step: waking a thread team
// costs more than it saves (and much more when the cores are shared).
constexpr int64_t kSerialBelow = 1 << 18;

// Portable path (no AVX2/FMA): the shared math on scalars; std::fma keeps the rounding
// of the vector kernels, at the price of speed on CPUs without an FMA instruction.
template <typename param_t, typename T>
void portable_range(const RangeRequest& r) {
  const Coeffs<T> c = make_coeffs<T>(r.hparams_row, r.step);
  auto* p = static_cast<param_t*>(r.param);
  const auto* g = static_cast<const param_t*>(r.grad);
  T* m = static_cast<T*>(r.exp_avg);
  T* v = static_cast<T*>(r.exp_avg_sq);
  T* vmax = static_cast<T*>(r.max_exp_avg_sq);
  float* master = static_cast<float*>(r.master);
  for (int64_t d = r.begin; d < r.end; ++d) {
    T pv = master ? T(master[d]) : static_cast<T>(p[d]);
    T vmaxv = vmax ? vmax[d] : T(0);
    update<ScalarOps>(pv, static_cast<T>(g[d]), m[d], v[d], vmax ? &vmaxv : nullptr, c,
                      r.has_scale, T(r.scale));
    if (vmax) vmax[d] = vmaxv;
    if (master) master[d] = float(pv);
    p[d] = static_cast<param_t>(pv);
  }
}

void portable_range_any(const RangeRequest& r) {
  switch (r.kind) {
    case ParamKind::kFloat: portable_range<float, float>(r); break;
    case ParamKind::kDouble: portable_range<double, double>(r); break;
    case ParamKind::kBFloat16: portable_range<at::BFloat16, float>(r); break;
    case ParamKind::kHalf: portable_range<at::Half, float>(r); break;
  }
}

enum class Isa { kPortable, kAvx2, kAvx512 };

// The widest kernel this CPU runs. All give the same bits; STEPLAW_CPU_ISA=avx2 or
// =portable (or STEPLAW_CPU_PORTABLE=1) forces a narrower one, so that the tests check
// every path on one machine.
Isa chosen_isa() {
  const char* forced = std::getenv("STEPLAW_CPU_ISA");
  const std::string want = forced ? forced : (std::getenv("STEPLAW_CPU_PORTABLE") ? "portable" : "");
  if (want == "portable") return Isa::kPortable;
  if (want != "avx2" && avx512_available()) return Isa::kAvx512;
  if (avx2_fma_available()) return Isa::kAvx2;
  return Isa::kPortable;
}

ParamKind kind_of(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return ParamKind::kFloat;
    case at::kDouble: return ParamKind::kDouble;
    case at::kBFloat16: return ParamKind::kBFloat16;
    case at::kHalf: return ParamKind::kHalf;
    default: STEPLAW_CHECK(false, "fused_adamw_ supports float32, float64, bfloat16 and float16 params, got ", type);
  }
  return ParamKind::kFloat;
}

void fused_adamw_cpu(
    at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList master_params,
    at::TensorList steps, const at::Tensor& hparams, at::IntArrayRef group_index, bool amsgrad,
    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
    at::OptionalIntArrayRef members) {
  STEPLAW_CHECK(hparams.device().is_cpu(), "fused_adamw_ on CPU expects hparams on the CPU");
  for (const auto& t : params) {
    STEPLAW_CHECK(t.device().is_cpu(), "fused_adamw_ on CPU got a param on ", t.device());
  }
  // GradScaler found an inf/nan: the step is skipped entirely (CPU memory, no sync cost).
  if (found_inf.has_value() && found_inf->defined() && found_inf->item<double>() != 0.0) return;
  const bool has_scale = grad_scale.has_value() && grad_scale->defined();
  const float scale = has_scale ? grad_scale->item<float>() : 1.0f;

  StagedLists staged = stage_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                   master_params, steps, hparams, group_index, amsgrad, members);
  const double* hp = hparams.const_data_ptr<double>();
  std::vector<RangeRequest> chunks;
  int64_t total = 0;
  for (size_t i = 0; i < staged.slots.size(); ++i) {
    const ParamSlot& s = staged.slots[i];
    RangeRequest base{};
    base.kind = kind_of(s.param.scalar_type());
    base.param = s.param.data_ptr();
    base.grad = s.grad.const_data_ptr();
    base.exp_avg = s.exp_avg.data_ptr();
    base.exp_avg_sq = s.exp_avg_sq.data_ptr();
    base.max_exp_avg_sq = s.max_exp_avg_sq.defined() ? s.max_exp_avg_sq.data_ptr() : nullptr;
    base.master = s.master.defined() ? s.master.data_ptr() : nullptr;
    base.step = double(*steps[i].const_data_ptr<float>()) + 1.0;
    base.has_scale = has_scale;
    base.scale = scale;
    const int64_t member_numel = s.param.numel() / s.members;
    for (int64_t k = 0; k < s.members; ++k) {
      const double* row = hp + (s.group + k) * kNumHparams;
      if (row_frozen(row)) continue;
      total += member_numel;
      const int64_t first = k * member_numel, last = first + member_numel;
      for (int64_t b = first; b < last; b += kChunk) {
        RangeRequest chunk = base;
        chunk.hparams_row = row;
        chunk.begin = b;
        chunk.end = std::min(last, b + kChunk);
        chunks.push_back(chunk);
      }
    }
  }
  static const Isa isa = chosen_isa();
  auto run_chunks = [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      switch (isa) {
        case Isa::kAvx512: update_range_avx512(chunks[k]); break;
        case Isa::kAvx2: update_range_avx2(chunks[k]); break;
        case Isa::kPortable: portable_range_any(chunks[k]); break;
      }
    }
  };
  const int64_t n_chunks = int64_t(chunks.size());
  const int64_t n_threads = std::min<int64_t>(at::get_num_threads(), n_chunks);
  if (total < kSerialBelow || n_threads <= 1) {
    run_chunks(0, n_chunks);
  } else {
    // Threads take chunks from a shared counter rather than a fixed half each, so a
    // thread that the OS schedules late (cores shared with other work) costs little.
    std::atomic<int64_t> next{0};
    at::parallel_for(0, n_threads, 1, [&](int64_t, int64_t) {
      for (int64_t k = next.fetch_add(1); k < n_chunks; k = next.fetch_add(1)) run_chunks(k, k + 1);
    });
  }
  staged.finish();
  // Plain stores: one dispatched add_ per tensor would cost more than the update of a
  // small tensor. (The dispatcher bumps the version counters of the mutated arguments.)
  for (const auto& step : steps) *step.data_ptr<float>() += 1.0f;
}

}  // namespace
}  // namespace adamw
}  // namespace steplaw

TORCH_LIBRARY_IMPL(steplaw, CPU, m) {
  m.impl("fused_adamw_", &steplaw::adamw::fused_adamw_cpu);
}
