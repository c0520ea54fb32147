// Interface of the hand-written CUTLASS 3.x SM90 (Hopper, sm_90a) grouped GEMMs behind
// grouped_mm / grouped_mm_wgrad (DESIGN.md section 3). The kernels live in
// csrc/cuda/sm90/*.cu, which compile only for sm_90a; the dispatcher in
// csrc/cuda/grouped_mm.cu includes this header only when ANYEXPERTS_SM90 is defined.
//
// This header is free of Torch and CUTLASS on purpose: the kernel files include CUTLASS
// and not Torch, which keeps their (long) compile times down, and the dispatcher includes
// Torch and not CUTLASS. Every problem argument is a raw pointer plus strides in elements;
// the caller has checked dtypes, devices, shapes and TMA alignment (16-byte aligned base
// pointers and strides) before calling in.
//
// Per-group problem sizes, operand pointers and strides are built on the device from
// `offsets` by a small kernel (group spans by anyexperts::group_span, rules.h): nothing is
// read back to the host, so the calls are CUDA-graph capturable.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace anyexperts::sm90 {

// Kernel schedules compiled for the forward (and dgrad) grouped GEMM. Which one runs for a
// given shape is decided in one place: select_forward_schedule() in csrc/cuda/grouped_mm.cu.
enum class Schedule : int {
  // KernelPtrArrayTmaWarpSpecializedCooperative, tile 128x256x64, cluster 2x1x1: both
  // consumer warpgroups work on one 128x256 tile (64x256 each); the 2x1 cluster multicasts
  // the B tile (the expert's weights) to the two CTAs that own neighbouring M tiles.
  kCooperative128x256 = 0,
  // KernelPtrArrayTmaWarpSpecializedPingpong, tile 64x256x64, cluster 1x1x1: the two
  // consumer warpgroups own separate 64x256 tiles and alternate mainloop and epilogue.
  // 64-row tiles waste less on small groups; no cluster, so no M-tile rounding either.
  kPingpong64x256 = 1,
};

enum class Dtype : int { kBFloat16 = 0, kFloat16 = 1 };

// Layout of b[g] (a K x N matrix) in memory.
enum class BLayout : int {
  kRowMajor = 0,  // b[g][k][n] at k*ldb + n  ([G,K,N] storage; CUTLASS RowMajor B)
  kColMajor = 1,  // b[g][k][n] at n*ldb + k  (transposed view of [G,N,K] storage, nn.Linear)
};

// out[rows of g] = a[rows of g] @ b[g] (forward, and dgrad with b transposed).
struct ForwardProblem {
  const void* a;          // a[R,K], element (r,k) at r*lda + k
  int64_t lda;
  const void* b;          // b[G,K,N], see BLayout; group g starts at b + g*b_group_stride
  int64_t ldb;
  int64_t b_group_stride;
  void* out;              // out[R,N], contiguous (ld = N)
  const int32_t* offsets; // [G] end offsets, device memory
  int64_t groups;         // G >= 1
  int64_t rows;           // R >= 1
  int64_t k;              // K >= 1, multiple of 8
  int64_t n;              // N >= 1, multiple of 8
};

// db[g] = a[rows of g]^T @ dout[rows of g] (weight gradient, variable-K grouped GEMM).
struct WgradProblem {
  const void* a;          // a[R,K], element (r,k) at r*lda + k
  int64_t lda;
  const void* dout;       // dout[R,N], element (r,n) at r*ldd + n
  int64_t ldd;
  void* db;               // db[G,K,N], contiguous
  const int32_t* offsets;
  int64_t groups;
  int64_t rows;
  int64_t k;              // multiple of 8
  int64_t n;              // multiple of 8
};

// Where and how to run. `workspace` must hold the bytes the matching *_workspace_bytes
// function returned (device memory, 256-byte aligned); `sm_count` must be the same in both
// calls. The current device must be `device`.
struct Launch {
  void* workspace;
  cudaStream_t stream;
  int device;
  int sm_count;
};

// A compiled kernel: its workspace size and its launcher. `run` returns nullptr on success,
// else a static error message (the caller raises it).
struct ForwardKernel {
  const char* name;
  size_t (*workspace_bytes)(int64_t groups, int sm_count);
  const char* (*run)(const ForwardProblem&, const Launch&);
};

struct WgradKernel {
  const char* name;
  size_t (*workspace_bytes)(int64_t groups, int sm_count);
  const char* (*run)(const WgradProblem&, const Launch&);
};

// Instantiations, one function per (dtype, B layout, schedule); see csrc/cuda/sm90/.
// fp16 has the cooperative schedule only: every instantiation costs over a minute of
// compile time, and bf16 is what MoE training runs in.
// grouped_mm_fwd_bf16.cu
ForwardKernel forward_bf16_rowmajor_cooperative();
ForwardKernel forward_bf16_colmajor_cooperative();
// grouped_mm_fwd_bf16_pingpong.cu
ForwardKernel forward_bf16_rowmajor_pingpong();
ForwardKernel forward_bf16_colmajor_pingpong();
// grouped_mm_fwd_fp16.cu
ForwardKernel forward_fp16_rowmajor_cooperative();
ForwardKernel forward_fp16_colmajor_cooperative();
// grouped_mm_wgrad.cu
WgradKernel wgrad_bf16();
WgradKernel wgrad_fp16();

}  // namespace anyexperts::sm90
