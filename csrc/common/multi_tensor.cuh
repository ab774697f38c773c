// Multi-tensor apply for CUDA: many tensors per launch, each cut into fixed-size chunks,
// one thread block per chunk. The table of tensors and chunks travels as a kernel
// argument (no host-to-device copy, so launches can be captured in CUDA graphs), which
// bounds it to kMaxTensors tensors and kMaxBlocks chunks per launch. The table is ~14 KB:
// kernel arguments up to 32 KB need CUDA >= 12.1 and sm_70+, which the H100/H200
// targets have; it lets a 100-tensor, 50M-parameter model go in one launch (763 blocks)
// instead of three whose last one leaves most SMs idle.
//
// A tensor may be cut into `segments` equal parts (the members of a stacked parameter,
// csrc/adamw/adamw_math.h): its chunks then never cross a part boundary, so a block
// works within one part; chunk_bounds() maps a block's chunk to its part and range.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "common/macros.h"

namespace steplaw {
namespace mta {

constexpr int kMaxTensors = 110;
constexpr int kMaxBlocks = 1280;
constexpr int64_t kChunk = 65536;  // elements per block

// `kLists` pointer lists (e.g. param, grad, exp_avg, ...) and per-tensor extras.
static_assert(kMaxTensors <= 255, "block_tensor is a uint8_t");

template <int kLists>
struct TensorTable {
  void* ptr[kLists][kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t tag[kMaxTensors];        // caller's per-tensor index (e.g. a hyperparameter row)
  int32_t segments[kMaxTensors];   // equal parts of the tensor that chunks do not cross
  const float* scalar[kMaxTensors];// caller's per-tensor scalar pointer (e.g. the step)
  uint8_t block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};

// Chunks of a tensor of `numel` elements in `segments` equal parts.
inline int64_t chunk_count(int64_t numel, int64_t segments) {
  const int64_t part = numel / segments;
  return segments * ((part + kChunk - 1) / kChunk);
}

// Part and element range [begin, end) of chunk `chunk` of such a tensor.
struct ChunkBounds {
  int64_t segment, begin, end;
};
STEPLAW_HOST_DEVICE inline ChunkBounds chunk_bounds(int64_t numel, int64_t segments, int64_t chunk) {
  const int64_t part = numel / segments;
  const int64_t per_part = (part + kChunk - 1) / kChunk;
  const int64_t segment = chunk / per_part;
  const int64_t begin = segment * part + (chunk % per_part) * kChunk;
  const int64_t part_end = (segment + 1) * part;
  return {segment, begin, begin + kChunk < part_end ? begin + kChunk : part_end};
}

// Puts tensors 0..n-1 (skipping those of no chunks) into tables through `fill(i, table, slot)`
// and calls `launch(table, n_blocks)` whenever a table is full, and at the end.
template <int kLists>
void for_each_table(int n, const std::function<void(int, TensorTable<kLists>&, int)>& fill,
                    const std::function<int64_t(int)>& chunks_of,
                    const std::function<void(const TensorTable<kLists>&, int)>& launch) {
  TensorTable<kLists> table;
  int n_tensors = 0, n_blocks = 0;
  for (int i = 0; i < n; ++i) {
    const int64_t chunks = chunks_of(i);  // chunk_count() of the tensor, 0 to skip it
    if (chunks == 0) continue;
    fill(i, table, n_tensors);  // tensor i into slot n_tensors
    ++n_tensors;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      table.block_tensor[n_blocks] = uint8_t(n_tensors - 1);
      table.block_chunk[n_blocks] = int32_t(chunk);
      ++n_blocks;
      const bool tensors_full = n_tensors == kMaxTensors && chunk == chunks - 1;
      const bool blocks_full = n_blocks == kMaxBlocks;
      if (tensors_full || blocks_full) {
        launch(table, n_blocks);
        n_blocks = 0;
        if (chunk == chunks - 1) {
          n_tensors = 0;
        } else {
          // The tensor continues in the next table, in slot 0.
          for (int l = 0; l < kLists; ++l) table.ptr[l][0] = table.ptr[l][n_tensors - 1];
          table.numel[0] = table.numel[n_tensors - 1];
          table.tag[0] = table.tag[n_tensors - 1];
          table.segments[0] = table.segments[n_tensors - 1];
          table.scalar[0] = table.scalar[n_tensors - 1];
          n_tensors = 1;
        }
      }
    }
  }
  if (n_blocks > 0) launch(table, n_blocks);
}

}  // namespace mta
}  // namespace steplaw
