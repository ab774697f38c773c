#!/usr/bin/env bash
# Plants one known bug at a time into a scratch copy of the committed tree (never into the
# working tree) and runs `make test-cuda-emu` there; each must fail. Prints, per bug, the
# first failing test and its message. Usage: tests/cuda_emu/plant_bugs.sh [VENV]
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VENV=${1:-$ROOT/.venv}
SCRATCH=$(mktemp -d /tmp/steplaw-plant.XXXXXX)
trap 'rm -rf "$SCRATCH"' EXIT

# name|file|sed expression (each must change exactly the intended line)
BUGS=(
  "removed __syncthreads (histogram, after zeroing)|csrc/moe/moe_cuda.cu|/for (int e = threadIdx.x; e < experts; e += blockDim.x) hist_smem\[e\] = 0;/{n;s/__syncthreads();/\/\/ planted/}"
  "warp reduction skips a step (block_sum)|csrc/moe/moe_cuda.cu|s/for (int offset = kWarp \/ 2; offset > 0; offset \/= 2)/for (int offset = kWarp \/ 2; offset > 1; offset \/= 2)/"
  "loop bound off by one (AdamW vector loop)|csrc/adamw/adamw_cuda.cu|s/for (int64_t k = threadIdx.x; k < n_packs; k += blockDim.x)/for (int64_t k = threadIdx.x; k <= n_packs; k += blockDim.x)/"
  "chunk-table offset off by one (chunk_bounds)|csrc/common/multi_tensor.cuh|s/const int64_t begin = segment \* part + (chunk % per_part) \* kChunk;/const int64_t begin = segment * part + (chunk % per_part) * kChunk + (chunk % per_part > 0);/"
)

status=0
for bug in "${BUGS[@]}"; do
  IFS='|' read -r name file expr <<<"$bug"
  rm -rf "$SCRATCH/tree" && mkdir -p "$SCRATCH/tree"
  git -C "$ROOT" archive HEAD | tar -x -C "$SCRATCH/tree"
  # The emulated module's build cache: ninja then recompiles only what the bug touches.
  [ -d "$ROOT/build/cuda_emu" ] && mkdir -p "$SCRATCH/tree/build" && cp -r "$ROOT/build/cuda_emu" "$SCRATCH/tree/build/"
  cp "$ROOT"/steplaw/_C*.so "$SCRATCH/tree/steplaw/" 2>/dev/null  # the CPU kernels the tests compare with
  before=$(md5sum "$SCRATCH/tree/$file")
  sed -i "$expr" "$SCRATCH/tree/$file"
  if [ "$before" = "$(md5sum "$SCRATCH/tree/$file")" ]; then
    echo "PLANT FAILED: $name (no change to $file)"; status=1; continue
  fi
  log="$SCRATCH/$RANDOM.log"
  (cd "$SCRATCH/tree" && PYTHONPATH="$SCRATCH/tree" make --no-print-directory -o "$VENV/.deps-stamp" test-cuda-emu VENV="$VENV" \
     PYTEST_ARGS="-x -q -p no:cacheprovider" >"$log" 2>&1)
  rc=$?
  if [ $rc -eq 0 ]; then
    echo "NOT CAUGHT: $name"; status=1
  else
    echo "caught: $name"
    grep -m1 -E "^FAILED|^ERROR" "$log" | cut -c1-400
    grep -m1 -E "^E  " "$log" | cut -c1-400
  fi
done
exit $status
