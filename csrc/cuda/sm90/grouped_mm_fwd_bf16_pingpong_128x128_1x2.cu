// SM90 grouped GEMM, forward and dgrad, bf16, ping-pong schedule (128x128x64, cluster 1x2).
// Schedule::kPingpong128x128 (grouped_mm_sm90.h): the default for K <= 1024
// (select_forward_schedule in csrc/cuda/grouped_mm.cu).
// out[rows of g] = a[rows of g] @ b[g]; one instantiation per layout of b.
#include "grouped_mm_sm90.cuh"

namespace anyexperts::sm90 {
namespace {

using Element = cutlass::bfloat16_t;
using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;  // M x N x K per CTA
using ClusterShape = cute::Shape<cute::_1, cute::_2, cute::_1>;   // CTAs per cluster along M, N
using Config = detail::PingpongSchedule<TileShape, ClusterShape>;
using Gemms = detail::ForwardGemms<Element, Config>;

}  // namespace

AE_SM90_FORWARD_KERNEL(forward_bf16_rowmajor_pingpong_128x128, Gemms::Row)
AE_SM90_FORWARD_KERNEL(forward_bf16_colmajor_pingpong_128x128, Gemms::Col)

}  // namespace anyexperts::sm90
