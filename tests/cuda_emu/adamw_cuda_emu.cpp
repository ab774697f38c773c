// The CUDA AdamW op, compiled by the host compiler against the emulation (tests/cuda_emu).
#include "adamw/adamw_cuda.cu"
