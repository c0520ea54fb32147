// SM90 grouped GEMM, forward and dgrad, bf16, ping-pong schedule (64x256x64, no cluster).
// out[rows of g] = a[rows of g] @ b[g]; one instantiation per layout of b.
#include "grouped_mm_sm90.cuh"

namespace anyexperts::sm90 {
namespace {

using Element = cutlass::bfloat16_t;
using Config = detail::PingpongConfig;
using Gemms = detail::ForwardGemms<Element, Config>;

}  // namespace

AE_SM90_FORWARD_KERNEL(forward_bf16_rowmajor_pingpong, Gemms::Row)
AE_SM90_FORWARD_KERNEL(forward_bf16_colmajor_pingpong, Gemms::Col)

}  // namespace anyexperts::sm90
