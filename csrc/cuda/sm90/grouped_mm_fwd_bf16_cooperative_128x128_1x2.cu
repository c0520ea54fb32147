// SM90 grouped GEMM, forward and dgrad, bf16, cooperative schedule (128x128x64, cluster 1x2).
// A candidate (Schedule::kCooperative128x128, grouped_mm_sm90.h): runs only when
// ANYEXPERTS_GROUPED_MM_SCHEDULE names it, until measurements pick a default.
// out[rows of g] = a[rows of g] @ b[g]; one instantiation per layout of b.
#include "grouped_mm_sm90.cuh"

namespace anyexperts::sm90 {
namespace {

using ElementA = cutlass::bfloat16_t;            // a[R,K]
using LayoutA = cutlass::layout::RowMajor;        //   K contiguous
using ElementB = cutlass::bfloat16_t;            // b[g], a K x N matrix
using LayoutBRow = cutlass::layout::RowMajor;     //   [G,K,N] storage: N contiguous
using LayoutBCol = cutlass::layout::ColumnMajor;  //   transposed [G,N,K] storage: K contiguous
using ElementD = cutlass::bfloat16_t;            // out[R,N]
using LayoutD = cutlass::layout::RowMajor;        //   N contiguous
using ElementAccumulator = float;
using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;    // M x N x K per CTA
using ClusterShape = cute::Shape<cute::_1, cute::_2, cute::_1>;  // CTAs per cluster along M, N
using Config = detail::CooperativeSchedule<TileShape, ClusterShape>;

using GemmRow = detail::GroupedGemm<ElementA, LayoutA, ElementB, LayoutBRow, ElementD, LayoutD,
                                    ElementAccumulator, Config>;
using GemmCol = detail::GroupedGemm<ElementA, LayoutA, ElementB, LayoutBCol, ElementD, LayoutD,
                                    ElementAccumulator, Config>;

}  // namespace

AE_SM90_FORWARD_KERNEL(forward_bf16_rowmajor_cooperative_128x128, GemmRow)
AE_SM90_FORWARD_KERNEL(forward_bf16_colmajor_cooperative_128x128, GemmCol)

}  // namespace anyexperts::sm90
