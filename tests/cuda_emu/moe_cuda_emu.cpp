// The CUDA MoE ops, compiled by the host compiler against the emulation (tests/cuda_emu).
#include "moe/moe_cuda.cu"
