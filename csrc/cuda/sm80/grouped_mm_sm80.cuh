// CUTLASS 2.x grouped GEMM machinery shared by the sm80 kernel files in this folder (each
// file instantiates its element and layout types from here). Structure, following CUTLASS
// example 24 (gemm_grouped):
//   GroupedGemm<...>      DefaultGemmGrouped: a multistage (cp.async) mainloop on mma.sync
//                         tensor cores, persistent threadblocks that find their tiles on the
//                         device from the problem sizes (GroupScheduleMode::kDeviceOnly).
//   ArgBuffers<Gemm>      per-group problem sizes, pointers and leading dimensions, carved
//                         out of the caller's workspace (a Torch tensor) and filled on the
//                         device by grouped_mm_prepare.cuh's kernels.
//   run_forward/run_wgrad host side: prepare kernel, then the GEMM, with a grid of as many
//                         threadblocks as fit on the GPU at once. No host synchronisation.
#pragma once

#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <mutex>

#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/device/gemm_grouped.h"
#include "cutlass/gemm/kernel/default_gemm_grouped.h"

#include "anyexperts/grouped_mm_prepare.cuh"
#include "anyexperts/grouped_mm_sm80.h"
#include "anyexperts/rules.h"

namespace anyexperts::sm80::detail {

// The one tile configuration (CUTLASS's usual Ampere bf16/fp16 choice): 128x128 output
// tiles, 4 warps of 64x64, 32-deep k-steps in 4 cp.async stages (64 KB of shared memory).
using ThreadblockShape = cutlass::gemm::GemmShape<128, 128, 32>;
using WarpShape = cutlass::gemm::GemmShape<64, 64, 32>;
using InstructionShape = cutlass::gemm::GemmShape<16, 8, 16>;  // mma.sync m16n8k16
constexpr int kStages = 4;
using ElementAccumulator = float;
using LayoutD = cutlass::layout::RowMajor;

template <class Element, class LayoutA_, class LayoutB_>
struct GroupedGemm {
  using ElementA = Element;
  using ElementB = Element;
  using ElementD = Element;
  using LayoutA = LayoutA_;
  using LayoutB = LayoutB_;
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;  // 16 bytes
  // D = acc (alpha = 1): the source C is never read.
  using EpilogueOp = cutlass::epilogue::thread::LinearCombination<
      ElementD, kAlignment, ElementAccumulator, ElementAccumulator,
      cutlass::epilogue::thread::ScaleType::OnlyAlphaScaling>;
  using Kernel = typename cutlass::gemm::kernel::DefaultGemmGrouped<
      ElementA, LayoutA, cutlass::ComplexTransform::kNone, kAlignment,
      ElementB, LayoutB, cutlass::ComplexTransform::kNone, kAlignment,
      ElementD, LayoutD, ElementAccumulator, cutlass::arch::OpClassTensorOp,
      cutlass::arch::Sm80, ThreadblockShape, WarpShape, InstructionShape, EpilogueOp,
      // ignored by the grouped kernels, which walk their tiles themselves
      cutlass::gemm::threadblock::GemmBatchedIdentityThreadblockSwizzle, kStages,
      cutlass::gemm::kernel::GroupScheduleMode::kDeviceOnly>::GemmKernel;
  using Device = cutlass::gemm::device::GemmGrouped<Kernel>;
  using Index = int64_t;  // LayoutA/B/D::Stride::LongIndex
};

// The forward (and dgrad) GEMMs of one element type, one per layout of b[g] (K x N):
// a[R,K] row-major, out[R,N] row-major.
template <class Element>
struct ForwardGemms {
  using Row = GroupedGemm<Element, cutlass::layout::RowMajor, cutlass::layout::RowMajor>;
  using Col = GroupedGemm<Element, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor>;
};

// The weight gradient: A = a_g^T (K x rows, a's rows contiguous: ColumnMajor), B = dout_g
// (rows x N, RowMajor), D = db[g] (K x N, RowMajor).
template <class Element>
using WgradGemm = GroupedGemm<Element, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;

// Device arrays of the per-group kernel arguments, carved from one workspace buffer.
template <class Gemm>
struct ArgBuffers {
  using Index = typename Gemm::Index;
  cutlass::gemm::GemmCoord* problem_sizes;
  typename Gemm::ElementA** ptr_a;
  typename Gemm::ElementB** ptr_b;
  typename Gemm::ElementD** ptr_d;
  Index* lda;
  Index* ldb;
  Index* ldd;

  // The arrays at `base`, or none with base nullptr (bytes() then counts them).
  static ArgBuffers carve(void* base, int64_t groups, size_t* bytes = nullptr) {
    grouped::ArrayCarver c(base);
    ArgBuffers buf;
    buf.problem_sizes = c.take<cutlass::gemm::GemmCoord>(groups);
    buf.ptr_a = c.take<typename Gemm::ElementA*>(groups);
    buf.ptr_b = c.take<typename Gemm::ElementB*>(groups);
    buf.ptr_d = c.take<typename Gemm::ElementD*>(groups);
    buf.lda = c.take<Index>(groups);
    buf.ldb = c.take<Index>(groups);
    buf.ldd = c.take<Index>(groups);
    if (bytes != nullptr) *bytes = c.bytes();
    return buf;
  }

  static size_t bytes(int64_t groups) {
    size_t n = 0;
    carve(nullptr, groups, &n);
    return n;
  }

  // The kernels take non-const operand pointers; they only read A and B.
  template <class T>
  __device__ static T* operand(const void* base, int64_t offset) {
    return const_cast<T*>(static_cast<const T*>(base)) + offset;
  }

  __device__ void set_forward(int64_t g, RowSpan span, const ForwardProblem& p) const {
    problem_sizes[g] = cutlass::gemm::GemmCoord(static_cast<int>(span.end - span.begin),
                                                static_cast<int>(p.n), static_cast<int>(p.k));
    ptr_a[g] = operand<typename Gemm::ElementA>(p.a, span.begin * p.lda);
    ptr_b[g] = operand<typename Gemm::ElementB>(p.b, g * p.b_group_stride);
    ptr_d[g] = static_cast<typename Gemm::ElementD*>(p.out) + span.begin * p.n;
    lda[g] = p.lda;
    ldb[g] = p.ldb;
    ldd[g] = p.n;
  }

  // GEMM view: M = K (hidden), N = N, K = rows of g; empty groups get (0,0,0). Problem
  // `slot` computes group g.
  __device__ void set_wgrad(int64_t slot, int64_t g, RowSpan span, const WgradProblem& p) const {
    const int64_t m = span.end - span.begin;
    problem_sizes[slot] = m > 0 ? cutlass::gemm::GemmCoord(static_cast<int>(p.k),
                                                           static_cast<int>(p.n), static_cast<int>(m))
                                : cutlass::gemm::GemmCoord(0, 0, 0);
    ptr_a[slot] = operand<typename Gemm::ElementA>(p.a, span.begin * p.lda);
    ptr_b[slot] = operand<typename Gemm::ElementB>(p.dout, span.begin * p.ldd);
    ptr_d[slot] = static_cast<typename Gemm::ElementD*>(p.db) + g * p.k * p.n;
    lda[slot] = p.lda;
    ldb[slot] = p.ldd;
    ldd[slot] = p.n;
  }
};

template <class Gemm>
size_t workspace_bytes(int64_t groups) {
  return ArgBuffers<Gemm>::bytes(groups);
}

// Threadblocks resident per SM, read once per device (this also opts the kernel into its
// 64 KB of dynamic shared memory). Returns nullptr or the CUDA error (not cached: a later
// call tries again), or an error when no threadblock fits.
template <class Gemm>
const char* blocks_per_sm(int device, int* blocks) {
  using Kernel = typename Gemm::Kernel;
  constexpr int kMaxDevices = 64;
  static std::mutex mutex;
  static std::array<int, kMaxDevices> cached{};  // 0: not read yet
  if (device < 0 || device >= kMaxDevices) return "anyexperts sm80 grouped GEMM: device index out of range";
  std::lock_guard<std::mutex> lock(mutex);
  if (cached[device] == 0) {
    const void* fn = reinterpret_cast<const void*>(&cutlass::Kernel<Kernel>);
    constexpr int kSmem = static_cast<int>(sizeof(typename Kernel::SharedStorage));
    cudaError_t err = cudaSuccess;
    if (kSmem >= (48 << 10)) {
      err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    }
    int n = 0;
    if (err == cudaSuccess) {
      err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, fn, Kernel::kThreadCount, kSmem);
    }
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      return cudaGetErrorString(err);
    }
    if (n <= 0) return "anyexperts sm80 grouped GEMM: no threadblock fits on an SM";
    cached[device] = n;
  }
  *blocks = cached[device];
  return nullptr;
}

template <class Gemm>
const char* launch_gemm(int64_t groups, const ArgBuffers<Gemm>& buf, const Launch& l) {
  using Kernel = typename Gemm::Kernel;
  int per_sm = 0;
  if (const char* err = blocks_per_sm<Gemm>(l.device, &per_sm)) return err;
  const int grid = per_sm * l.sm_count;
  // ptr_C / ldc: the epilogue never reads the source (OnlyAlphaScaling); D stands in.
  typename Kernel::Arguments args(buf.problem_sizes, static_cast<int>(groups), grid,
                                  typename Gemm::EpilogueOp::Params{}, buf.ptr_a, buf.ptr_b,
                                  buf.ptr_d, buf.ptr_d, buf.lda, buf.ldb, buf.ldd, buf.ldd);
  const typename Kernel::Params params(args);
  constexpr int kSmem = static_cast<int>(sizeof(typename Kernel::SharedStorage));
  cutlass::Kernel<Kernel><<<grid, Kernel::kThreadCount, kSmem, l.stream>>>(params);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <class Gemm>
const char* run_forward(const ForwardProblem& p, const Launch& l) {
  const auto buf = ArgBuffers<Gemm>::carve(l.workspace, p.groups);
  if (const char* err = grouped::prepare_forward(buf, p, l.sm_count, l.stream)) return err;
  return launch_gemm<Gemm>(p.groups, buf, l);
}

template <class Gemm>
const char* run_wgrad(const WgradProblem& p, const Launch& l) {
  const auto buf = ArgBuffers<Gemm>::carve(l.workspace, p.groups);
  if (const char* err = grouped::prepare_wgrad(buf, p, l.stream)) return err;
  return launch_gemm<Gemm>(p.groups, buf, l);
}

}  // namespace anyexperts::sm80::detail

// Defines `ForwardKernel fn()` / `WgradKernel fn()` for a GroupedGemm type.
#define AE_SM80_FORWARD_KERNEL(fn, GemmType)                                            \
  ForwardKernel fn() {                                                                 \
    return {#fn, &detail::workspace_bytes<GemmType>, &detail::run_forward<GemmType>}; \
  }

#define AE_SM80_WGRAD_KERNEL(fn, GemmType)                                            \
  WgradKernel fn() {                                                                 \
    return {#fn, &detail::workspace_bytes<GemmType>, &detail::run_wgrad<GemmType>}; \
  }
