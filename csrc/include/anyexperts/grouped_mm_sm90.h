// Interface of the hand-written CUTLASS 3.x SM90 (Hopper, sm_90a) grouped GEMMs behind
// grouped_mm / grouped_mm_wgrad (DESIGN.md section 3). The kernels live in
// csrc/cuda/sm90/*.cu, which compile only for sm_90a; the dispatcher in
// csrc/cuda/grouped_mm.cu includes this header only when ANYEXPERTS_SM90 is defined.
//
// This header is free of Torch and CUTLASS on purpose: the kernel files include CUTLASS
// and not Torch, which keeps their (long) compile times down, and the dispatcher includes
// Torch and not CUTLASS. The problems are grouped_mm_problem.h's; the caller has checked
// dtypes, devices, shapes and TMA alignment (16-byte aligned base pointers and strides)
// before calling in.
//
// Per-group problem sizes, operand pointers and strides are built on the device from
// `offsets` by a small kernel (group spans by the group end rule of rules.h, one block
// scan of the offsets: grouped_mm_prepare.cuh): nothing is read back to the host, so the
// calls are CUDA-graph capturable.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "anyexperts/grouped_mm_problem.h"

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
  // ---- bf16 only, compiled so that one benchmark run on an H100 (bench/bench_grouped_mm.py
  // --sweep) can compare them with the two schedules above on the real layer shapes. The
  // default choice takes kPingpong128x128 for short K; the other two have not won yet.
  //
  // KernelPtrArrayTmaWarpSpecializedCooperative, tile 128x128x64, cluster 1x2x1: half the
  // N width of kCooperative128x256, so twice the tiles (finer balance across the 132 SMs
  // for skewed loads and at the end of the launch) and half the shared memory per stage
  // (32 KB: more stages in flight). The 1x2 cluster multicasts the A tile (the tokens' rows) to the CTAs of neighbouring N
  // tiles, and rounds the N tiles (the same for every group) up to even instead of every
  // group's M tiles, as a 2x1 cluster does: no padding tiles when N % 256 == 0 (all the
  // benchmark shapes), whatever the group sizes.
  kCooperative128x128 = 2,
  // KernelPtrArrayTmaWarpSpecializedCooperative, tile 256x128x64, cluster 2x1x1: a tile
  // shape cuBLAS often picks for large bf16 GEMMs on H100 (each warpgroup a 128x128
  // accumulator); the same bytes per k-step as 128x256, but A is the larger operand tile
  // and N splits finer (768 = 6 tiles of 128). Candidate for the few-large-experts shape
  // (E8, F14336); groups are rounded up to 512 rows, so expect losses on skewed loads.
  kCooperative256x128 = 3,
  // KernelPtrArrayTmaWarpSpecializedPingpong, tile 128x128x64, cluster 1x2x1: each
  // consumer warpgroup owns a whole 128x128 tile and its epilogue overlaps the other
  // warpgroup's mainloop. The default where K is short (dgrad of fine-grained experts:
  // K = F = 768 or 1024), so that the epilogue is a large share of a tile's time.
  kPingpong128x128 = 4,
};

// Tile order of the persistent group tile scheduler within each group
// (cutlass::gemm::kernel::detail::RasterOrderOptions).
enum class Raster : int {
  kAlongM = 0,     // consecutive tiles walk down M, sharing an N tile (B reuse in L2);
                   // CUTLASS's default for grouped GEMMs and what ran before this knob
  kAlongN = 1,     // consecutive tiles walk along N, sharing an M tile (A reuse in L2)
  kHeuristic = 2,  // CUTLASS decides from the launch-time tile counts; with device-side
                   // problem shapes it sees (sm_count x 1) tiles and so picks kAlongN
};

// How the persistent tile scheduler orders tiles. The defaults are CUTLASS's grouped
// defaults, which grouped_mm_wgrad runs with; grouped_mm picks its raster per shape
// (select_forward_scheduling in csrc/cuda/grouped_mm.cu).
struct Scheduling {
  Raster raster = Raster::kAlongM;
  // 1, 2, 4 or 8: tiles are visited in swizzle-wide strips across the raster direction.
  // Each group's tile grid is rounded up to a multiple of swizzle x cluster in both M and
  // N; the extra tiles lie outside the group and are computed and discarded, so a swizzle
  // that does not divide the tile counts costs work.
  int swizzle = 1;
};

using grouped::BLayout;
using grouped::ForwardProblem;
using grouped::WgradProblem;

// Where and how to run. `workspace` must hold the bytes the kernel's workspace_bytes
// returned (device memory, 256-byte aligned); `sm_count` must be the same in both calls. The current device must be `device`.
struct Launch {
  void* workspace;
  cudaStream_t stream;
  int device;
  int sm_count;
  Scheduling scheduling{};
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
// fp16 has the kCooperative128x256 schedule only: every instantiation costs over a minute
// of compile time, and bf16 is what MoE training runs in.
// grouped_mm_fwd_bf16.cu
ForwardKernel forward_bf16_rowmajor_cooperative();
ForwardKernel forward_bf16_colmajor_cooperative();
// grouped_mm_fwd_bf16_pingpong.cu
ForwardKernel forward_bf16_rowmajor_pingpong();
ForwardKernel forward_bf16_colmajor_pingpong();
// grouped_mm_fwd_bf16_cooperative_128x128_1x2.cu
ForwardKernel forward_bf16_rowmajor_cooperative_128x128();
ForwardKernel forward_bf16_colmajor_cooperative_128x128();
// grouped_mm_fwd_bf16_cooperative_256x128_2x1.cu
ForwardKernel forward_bf16_rowmajor_cooperative_256x128();
ForwardKernel forward_bf16_colmajor_cooperative_256x128();
// grouped_mm_fwd_bf16_pingpong_128x128_1x2.cu
ForwardKernel forward_bf16_rowmajor_pingpong_128x128();
ForwardKernel forward_bf16_colmajor_pingpong_128x128();
// grouped_mm_fwd_fp16.cu
ForwardKernel forward_fp16_rowmajor_cooperative();
ForwardKernel forward_fp16_colmajor_cooperative();
// grouped_mm_wgrad.cu
WgradKernel wgrad_bf16();
WgradKernel wgrad_fp16();

}  // namespace anyexperts::sm90
