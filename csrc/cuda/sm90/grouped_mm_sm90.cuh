// CUTLASS 3.x SM90 grouped GEMM machinery shared by the kernel files in this folder
// (each file names its element and layout types at the top and instantiates from here).
//
// Structure, following CUTLASS example 57 (hopper grouped GEMM):
//   GroupedGemm<...>      the CollectiveBuilder-made mainloop + epilogue + GemmUniversal
//                         kernel over cutlass::gemm::GroupProblemShape<Shape<int,int,int>>.
//   ArgBuffers<Gemm>      per-group problem sizes, pointers and strides, carved out of the
//                         caller's workspace (a Torch tensor) after CUTLASS's own workspace,
//                         and filled on the device by grouped_mm_prepare.cuh's kernels.
//   run_forward/run_wgrad host side: prepare kernel, Arguments with device-only problem
//                         shapes (host_problem_shapes = nullptr), to_underlying_arguments,
//                         launch. No host synchronisation anywhere.
#pragma once

#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <mutex>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"

#include "anyexperts/grouped_mm_prepare.cuh"
#include "anyexperts/grouped_mm_sm90.h"
#include "anyexperts/rules.h"

#if !defined(CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED)
#error "The SM90 grouped GEMM needs CUDA >= 12.3 (modifiable TMA descriptors)"
#endif

namespace anyexperts::sm90::detail {

using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;  // <M,N,K> per group
using UnderlyingProblemShape = ProblemShape::UnderlyingProblemShape;

// The schedules of Schedule (grouped_mm_sm90.h), as CUTLASS types.
template <class TileShape_, class ClusterShape_>
struct CooperativeSchedule {
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
  using TileShape = TileShape_;
  using ClusterShape = ClusterShape_;
};

template <class TileShape_, class ClusterShape_>
struct PingpongSchedule {
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
  using TileShape = TileShape_;
  using ClusterShape = ClusterShape_;
};

// Schedule::kCooperative128x256
using CooperativeConfig = CooperativeSchedule<cute::Shape<cute::_128, cute::_256, cute::_64>,
                                              cute::Shape<cute::_2, cute::_1, cute::_1>>;
// Schedule::kPingpong64x256
using PingpongConfig = PingpongSchedule<cute::Shape<cute::_64, cute::_256, cute::_64>,
                                        cute::Shape<cute::_1, cute::_1, cute::_1>>;
// The candidate schedules name their tile and cluster shapes at the top of their files.

template <class ElementA_, class LayoutA_, class ElementB_, class LayoutB_, class ElementD_,
          class LayoutD_, class ElementAccumulator_, class Config>
struct GroupedGemm {
  using ElementA = ElementA_;
  using LayoutA = LayoutA_;
  using ElementB = ElementB_;
  using LayoutB = LayoutB_;
  using ElementD = ElementD_;
  using LayoutD = LayoutD_;
  using ElementAccumulator = ElementAccumulator_;
  static constexpr int AlignmentA = 128 / cutlass::sizeof_bits<ElementA>::value;  // 16 bytes
  static constexpr int AlignmentB = 128 / cutlass::sizeof_bits<ElementB>::value;
  static constexpr int AlignmentD = 128 / cutlass::sizeof_bits<ElementD>::value;

  using ArchTag = cutlass::arch::Sm90;
  using OperatorClass = cutlass::arch::OpClassTensorOp;
  using TileShape = typename Config::TileShape;
  using ClusterShape = typename Config::ClusterShape;
  using KernelSchedule = typename Config::KernelSchedule;
  using EpilogueSchedule = typename Config::EpilogueSchedule;

  // D = acc (alpha = 1), no source: ElementC = void, so no C loads and no smem for C.
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      ArchTag, OperatorClass, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAccumulator, ElementAccumulator,
      void, LayoutD*, AlignmentD, ElementD, LayoutD*, AlignmentD, EpilogueSchedule,
      cutlass::epilogue::fusion::LinearCombination<ElementD, ElementAccumulator>>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      ArchTag, OperatorClass, ElementA, LayoutA*, AlignmentA, ElementB, LayoutB*, AlignmentB,
      ElementAccumulator, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using Kernel =
      cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Adapter = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
};

// The forward (and dgrad) GEMMs of one element type and schedule, one per layout of b[g]
// (a K x N matrix): a[R,K] row-major (K contiguous), out[R,N] row-major, fp32 accumulation.
// Each grouped_mm_fwd_*.cu file picks Element and Config and instantiates both.
template <class Element, class Config>
struct ForwardGemms {
  using RowMajor = cutlass::layout::RowMajor;
  using ColumnMajor = cutlass::layout::ColumnMajor;
  // b as [G,K,N] storage: N contiguous
  using Row =
      GroupedGemm<Element, RowMajor, Element, RowMajor, Element, RowMajor, float, Config>;
  // b as a transposed view of [G,N,K] storage (nn.Linear): K contiguous
  using Col =
      GroupedGemm<Element, RowMajor, Element, ColumnMajor, Element, RowMajor, float, Config>;
};

// Each stride here is rank 3 (outer, inner, batch=_0) with one unit mode and one dynamic
// mode: set the dynamic one (the leading dimension).
template <class Stride>
__host__ __device__ inline Stride make_ld_stride(int64_t ld) {
  Stride s{};
  if constexpr (cute::is_static<cute::remove_cvref_t<decltype(cute::get<0>(s))>>::value) {
    cute::get<1>(s) = ld;
  } else {
    cute::get<0>(s) = ld;
  }
  return s;
}

// Device arrays of the per-group kernel arguments, carved from one workspace buffer.
template <class Gemm>
struct ArgBuffers {
  UnderlyingProblemShape* problem_sizes;
  const typename Gemm::ElementA** ptr_a;
  const typename Gemm::ElementB** ptr_b;
  typename Gemm::ElementD** ptr_d;
  typename Gemm::StrideA* stride_a;
  typename Gemm::StrideB* stride_b;
  typename Gemm::StrideD* stride_d;

  // The arrays at `base`, or none with base nullptr (bytes() then counts them).
  static ArgBuffers carve(void* base, int64_t groups, size_t* bytes = nullptr) {
    grouped::ArrayCarver c(base);
    ArgBuffers buf;
    buf.problem_sizes = c.take<UnderlyingProblemShape>(groups);
    buf.ptr_a = c.take<const typename Gemm::ElementA*>(groups);
    buf.ptr_b = c.take<const typename Gemm::ElementB*>(groups);
    buf.ptr_d = c.take<typename Gemm::ElementD*>(groups);
    buf.stride_a = c.take<typename Gemm::StrideA>(groups);
    buf.stride_b = c.take<typename Gemm::StrideB>(groups);
    buf.stride_d = c.take<typename Gemm::StrideD>(groups);
    if (bytes != nullptr) *bytes = c.bytes();
    return buf;
  }

  static size_t bytes(int64_t groups) {
    size_t n = 0;
    carve(nullptr, groups, &n);
    return n;
  }

  __device__ void set_forward(int64_t g, RowSpan span, const ForwardProblem& p) const {
    problem_sizes[g] = UnderlyingProblemShape(static_cast<int>(span.end - span.begin),
                                              static_cast<int>(p.n), static_cast<int>(p.k));
    ptr_a[g] = static_cast<const typename Gemm::ElementA*>(p.a) + span.begin * p.lda;
    ptr_b[g] = static_cast<const typename Gemm::ElementB*>(p.b) + g * p.b_group_stride;
    ptr_d[g] = static_cast<typename Gemm::ElementD*>(p.out) + span.begin * p.n;
    stride_a[g] = make_ld_stride<typename Gemm::StrideA>(p.lda);
    stride_b[g] = make_ld_stride<typename Gemm::StrideB>(p.ldb);
    stride_d[g] = make_ld_stride<typename Gemm::StrideD>(p.n);
  }

  // GEMM view: M = K (hidden), N = N, K = rows of g. A = a_g^T is M-major (ColumnMajor),
  // B = dout_g is N-major (RowMajor), D = db[g] RowMajor; problem `slot` computes group g.
  __device__ void set_wgrad(int64_t slot, int64_t g, RowSpan span, const WgradProblem& p) const {
    const int64_t m = span.end - span.begin;
    problem_sizes[slot] = m > 0 ? UnderlyingProblemShape(static_cast<int>(p.k), static_cast<int>(p.n),
                                                         static_cast<int>(m))
                                : UnderlyingProblemShape(0, 0, 0);
    ptr_a[slot] = static_cast<const typename Gemm::ElementA*>(p.a) + span.begin * p.lda;
    ptr_b[slot] = static_cast<const typename Gemm::ElementB*>(p.dout) + span.begin * p.ldd;
    ptr_d[slot] = static_cast<typename Gemm::ElementD*>(p.db) + g * p.k * p.n;
    stride_a[slot] = make_ld_stride<typename Gemm::StrideA>(p.lda);
    stride_b[slot] = make_ld_stride<typename Gemm::StrideB>(p.ldd);
    stride_d[slot] = make_ld_stride<typename Gemm::StrideD>(p.n);
  }
};

// One-time (per device) kernel attributes: dynamic smem opt-in and the number of clusters
// that fit at once (the persistent grid size). Returns nullptr or an error message.
template <class Kernel>
const char* setup_kernel(int device, int* max_active_clusters) {
  constexpr int kMaxDevices = 64;
  static std::mutex mutex;
  static std::array<int, kMaxDevices> clusters{};  // 0: not set up yet
  if (device < 0 || device >= kMaxDevices) return "anyexperts sm90 grouped GEMM: device index out of range";
  std::lock_guard<std::mutex> lock(mutex);
  if (clusters[device] == 0) {
    const int smem = Kernel::SharedStorageSize;
    const void* fn = reinterpret_cast<const void*>(&cutlass::device_kernel<Kernel>);
    if (smem >= (48 << 10)) {
      if (cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess) {
        (void)cudaGetLastError();
        return "anyexperts sm90 grouped GEMM: cudaFuncSetAttribute(max dynamic smem) failed";
      }
    }
    using ClusterShape = typename Kernel::ClusterShape;
    const unsigned cm = cute::size<0>(ClusterShape{});
    const unsigned cn = cute::size<1>(ClusterShape{});
    int n = -1;  // -1: let CUTLASS size the grid from the SM count
    if (cm * cn > 1) {
      cudaLaunchAttribute attr{};
      attr.id = cudaLaunchAttributeClusterDimension;
      attr.val.clusterDim.x = cm;
      attr.val.clusterDim.y = cn;
      attr.val.clusterDim.z = 1;
      cudaLaunchConfig_t config{};
      config.gridDim = dim3(cm, cn, 1);
      config.blockDim = dim3(Kernel::MaxThreadsPerBlock, 1, 1);
      config.dynamicSmemBytes = smem;
      config.attrs = &attr;
      config.numAttrs = 1;
      int active = 0;
      if (cudaOccupancyMaxActiveClusters(&active, fn, &config) == cudaSuccess && active > 0) {
        n = active;
      } else {
        (void)cudaGetLastError();
      }
    }
    clusters[device] = n;
  }
  *max_active_clusters = clusters[device] > 0 ? clusters[device] : 0;
  return nullptr;
}

inline const char* status_message(cutlass::Status s) {
  switch (s) {
    case cutlass::Status::kSuccess: return nullptr;
    case cutlass::Status::kErrorMisalignedOperand: return "CUTLASS: misaligned operand";
    case cutlass::Status::kErrorInvalidProblem: return "CUTLASS: invalid problem";
    case cutlass::Status::kErrorNotSupported: return "CUTLASS: not supported";
    case cutlass::Status::kErrorWorkspaceNull: return "CUTLASS: workspace is null";
    case cutlass::Status::kErrorInternal: return "CUTLASS: internal error (kernel launch failed)";
    case cutlass::Status::kErrorArchMismatch: return "CUTLASS: architecture mismatch";
    case cutlass::Status::kErrorInsufficientDriver: return "CUTLASS: insufficient driver";
    case cutlass::Status::kErrorMemoryAllocation: return "CUTLASS: memory allocation failed";
    default: return "CUTLASS: error";
  }
}

inline cutlass::gemm::kernel::detail::RasterOrderOptions raster_option(Raster r) {
  using Options = cutlass::gemm::kernel::detail::RasterOrderOptions;
  switch (r) {
    case Raster::kAlongN: return Options::AlongN;
    case Raster::kHeuristic: return Options::Heuristic;
    default: return Options::AlongM;
  }
}

// log2 of the swizzle (1, 2, 4, 8 -> 0..3; anything else rounds down, at most 3).
inline int log_swizzle(int swizzle) {
  return swizzle >= 8 ? 3 : swizzle >= 4 ? 2 : swizzle >= 2 ? 1 : 0;
}

template <class Gemm>
typename Gemm::Kernel::Arguments make_arguments(int64_t groups, const ArgBuffers<Gemm>& buf,
                                                int device, int sm_count,
                                                int max_active_clusters,
                                                const Scheduling& scheduling = {}) {
  typename Gemm::Kernel::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
  // Problem shapes live only on the device: host_problem_shapes = nullptr.
  args.problem_shape = {static_cast<int32_t>(groups), buf.problem_sizes, nullptr};
  args.mainloop.ptr_A = buf.ptr_a;
  args.mainloop.dA = buf.stride_a;
  args.mainloop.ptr_B = buf.ptr_b;
  args.mainloop.dB = buf.stride_b;
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  args.epilogue.ptr_C = nullptr;
  args.epilogue.dC = nullptr;
  args.epilogue.ptr_D = buf.ptr_d;
  args.epilogue.dD = buf.stride_d;
  args.hw_info.device_id = device;
  args.hw_info.sm_count = sm_count;
  args.hw_info.max_active_clusters = max_active_clusters;
  args.scheduler.raster_order = raster_option(scheduling.raster);
  args.scheduler.max_swizzle_size = 1 << log_swizzle(scheduling.swizzle);
  return args;
}

// CUTLASS's workspace (per-SM TMA descriptors) first, then the argument arrays.
template <class Gemm>
size_t cutlass_workspace_bytes(int64_t groups, int sm_count) {
  ArgBuffers<Gemm> none{};
  auto args = make_arguments<Gemm>(groups, none, 0, sm_count, 0);
  return grouped::align_up(Gemm::Kernel::get_workspace_size(args), 256);
}

template <class Gemm>
size_t workspace_bytes(int64_t groups, int sm_count) {
  return cutlass_workspace_bytes<Gemm>(groups, sm_count) + ArgBuffers<Gemm>::bytes(groups);
}

template <class Gemm>
const char* launch_gemm(int64_t groups, const ArgBuffers<Gemm>& buf, const Launch& l) {
  int max_active_clusters = 0;
  if (const char* err = setup_kernel<typename Gemm::Kernel>(l.device, &max_active_clusters)) return err;
  auto args = make_arguments<Gemm>(groups, buf, l.device, l.sm_count, max_active_clusters,
                                   l.scheduling);
  if (!Gemm::Kernel::can_implement(args)) return "CUTLASS: grouped GEMM arguments not implementable";
  cutlass::Status status = Gemm::Kernel::initialize_workspace(args, l.workspace, l.stream);
  if (status != cutlass::Status::kSuccess) return status_message(status);
  auto params = Gemm::Kernel::to_underlying_arguments(args, l.workspace);
  // The group scheduler derives its swizzle from the launch-time tile grid, which for
  // grouped problems is (tiles x 1): max_swizzle_size alone never takes effect (CUTLASS
  // 4.2, PersistentTileSchedulerSm90GroupParams::initialize). The device side does apply
  // log_swizzle_size_ per group, and the kernel's get_grid_shape reads it back from the
  // params, so it is set here. Extra tiles from rounding a group's tile grid up to the
  // swizzle lie outside the group: TMA reads zeros there and the store clips them.
  params.scheduler.log_swizzle_size_ = log_swizzle(l.scheduling.swizzle);
  status = Gemm::Adapter::run(params, l.stream);
  if (status != cutlass::Status::kSuccess) return status_message(status);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <class Gemm>
ArgBuffers<Gemm> arg_buffers(int64_t groups, const Launch& l) {
  return ArgBuffers<Gemm>::carve(
      static_cast<char*>(l.workspace) + cutlass_workspace_bytes<Gemm>(groups, l.sm_count), groups);
}

template <class Gemm>
const char* run_forward(const ForwardProblem& p, const Launch& l) {
  const auto buf = arg_buffers<Gemm>(p.groups, l);
  if (const char* err = grouped::prepare_forward(buf, p, l.sm_count, l.stream)) return err;
  return launch_gemm<Gemm>(p.groups, buf, l);
}

template <class Gemm>
const char* run_wgrad(const WgradProblem& p, const Launch& l) {
  const auto buf = arg_buffers<Gemm>(p.groups, l);
  if (const char* err = grouped::prepare_wgrad(buf, p, l.stream)) return err;
  return launch_gemm<Gemm>(p.groups, buf, l);
}

}  // namespace anyexperts::sm90::detail

// Defines `ForwardKernel fn()` for a GroupedGemm type.
#define AE_SM90_FORWARD_KERNEL(fn, GemmType)                                            \
  ForwardKernel fn() {                                                                 \
    return {#fn, &detail::workspace_bytes<GemmType>, &detail::run_forward<GemmType>}; \
  }

#define AE_SM90_WGRAD_KERNEL(fn, GemmType)                                            \
  WgradKernel fn() {                                                                 \
    return {#fn, &detail::workspace_bytes<GemmType>, &detail::run_wgrad<GemmType>}; \
  }
