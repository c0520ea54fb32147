// SM90 grouped GEMM, forward and dgrad, fp16, cooperative schedule (128x256x64, cluster 2x1).
// out[rows of g] = a[rows of g] @ b[g]; one instantiation per layout of b.
#include "grouped_mm_sm90.cuh"

namespace anyexperts::sm90 {
namespace {

using Element = cutlass::half_t;
using Config = detail::CooperativeConfig;
using Gemms = detail::ForwardGemms<Element, Config>;

}  // namespace

AE_SM90_FORWARD_KERNEL(forward_fp16_rowmajor_cooperative, Gemms::Row)
AE_SM90_FORWARD_KERNEL(forward_fp16_colmajor_cooperative, Gemms::Col)

}  // namespace anyexperts::sm90
