// SM90 grouped GEMM, forward and dgrad, bf16, ping-pong schedule (64x256x64, no cluster).
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
using Config = detail::PingpongConfig;

using GemmRow = detail::GroupedGemm<ElementA, LayoutA, ElementB, LayoutBRow, ElementD, LayoutD,
                                    ElementAccumulator, Config>;
using GemmCol = detail::GroupedGemm<ElementA, LayoutA, ElementB, LayoutBCol, ElementD, LayoutD,
                                    ElementAccumulator, Config>;

}  // namespace

AE_SM90_FORWARD_KERNEL(forward_bf16_rowmajor_pingpong, GemmRow)
AE_SM90_FORWARD_KERNEL(forward_bf16_colmajor_pingpong, GemmCol)

}  // namespace anyexperts::sm90
