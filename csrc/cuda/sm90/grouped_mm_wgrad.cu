// SM90 grouped GEMM for the weight gradient, bf16 and fp16, cooperative schedule
// (128x256x64, cluster 2x1): db[g] = a[rows of g]^T @ dout[rows of g], a variable-K grouped
// GEMM with M = K (a's columns), N = N (dout's columns), K = rows of group g.
#include "grouped_mm_sm90.cuh"

namespace anyexperts::sm90 {
namespace {

using ElementBF16 = cutlass::bfloat16_t;
using ElementFP16 = cutlass::half_t;
using LayoutA = cutlass::layout::ColumnMajor;  // A = a_g^T (K x rows): a's rows are contiguous in M
using LayoutB = cutlass::layout::RowMajor;     // B = dout_g (rows x N): N contiguous
using LayoutD = cutlass::layout::RowMajor;     // db[g] (K x N), contiguous
using ElementAccumulator = float;
using Config = detail::CooperativeConfig;

using GemmBF16 = detail::GroupedGemm<ElementBF16, LayoutA, ElementBF16, LayoutB, ElementBF16,
                                     LayoutD, ElementAccumulator, Config>;
using GemmFP16 = detail::GroupedGemm<ElementFP16, LayoutA, ElementFP16, LayoutB, ElementFP16,
                                     LayoutD, ElementAccumulator, Config>;

}  // namespace

AE_SM90_WGRAD_KERNEL(wgrad_bf16, GemmBF16)
AE_SM90_WGRAD_KERNEL(wgrad_fp16, GemmFP16)

}  // namespace anyexperts::sm90
