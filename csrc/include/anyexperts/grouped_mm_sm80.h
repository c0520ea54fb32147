// Interface of the CUTLASS 2.x grouped GEMMs for sm_80 and newer (Ampere tensor cores:
// mma.sync, cp.async) behind grouped_mm / grouped_mm_wgrad where the SM90 kernels do not
// run: A100, A10, L4, L40, RTX 30/40 (and H100 when ANYEXPERTS_GROUPED_MM_BACKEND=sm80).
// The kernels live in csrc/cuda/sm80/*.cu; the dispatcher (csrc/cuda/grouped_mm.cu)
// includes this header only when ANYEXPERTS_SM80 is defined.
//
// Free of Torch and CUTLASS, as grouped_mm_sm90.h. Per-group problem sizes, pointers and
// leading dimensions are built on the device from `offsets` (grouped_mm_prepare.cuh) and
// the kernels schedule their tiles on the device (GroupScheduleMode::kDeviceOnly): nothing
// is read back to the host, so the calls are CUDA-graph capturable.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "anyexperts/grouped_mm_problem.h"

namespace anyexperts::sm80 {

using grouped::BLayout;
using grouped::ForwardProblem;
using grouped::WgradProblem;

// Where to run. `workspace` must hold the bytes the kernel's workspace_bytes returned
// (device memory, 256-byte aligned). The current device must be `device`.
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
  size_t (*workspace_bytes)(int64_t groups);
  const char* (*run)(const ForwardProblem&, const Launch&);
};

struct WgradKernel {
  const char* name;
  size_t (*workspace_bytes)(int64_t groups);
  const char* (*run)(const WgradProblem&, const Launch&);
};

// One tile configuration for every shape (128x128x32 threadblocks, 64x64x32 warps, 4
// stages), one function per (dtype, B layout). grouped_mm_fwd.cu:
ForwardKernel forward_bf16_rowmajor();
ForwardKernel forward_bf16_colmajor();
ForwardKernel forward_fp16_rowmajor();
ForwardKernel forward_fp16_colmajor();
// grouped_mm_wgrad.cu:
WgradKernel wgrad_bf16();
WgradKernel wgrad_fp16();

}  // namespace anyexperts::sm80
