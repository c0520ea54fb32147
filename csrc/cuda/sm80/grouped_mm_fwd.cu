// SM80 grouped GEMM, forward and dgrad: out[rows of g] = a[rows of g] @ b[g], bf16 and fp16,
// b[g] row-major ([G,K,N] storage) or column-major (nn.Linear's [G,N,K], transposed view).
#include "grouped_mm_sm80.cuh"

namespace anyexperts::sm80 {
namespace {

using GemmsBF16 = detail::ForwardGemms<cutlass::bfloat16_t>;
using GemmsFP16 = detail::ForwardGemms<cutlass::half_t>;

}  // namespace

AE_SM80_FORWARD_KERNEL(forward_bf16_rowmajor, GemmsBF16::Row)
AE_SM80_FORWARD_KERNEL(forward_bf16_colmajor, GemmsBF16::Col)
AE_SM80_FORWARD_KERNEL(forward_fp16_rowmajor, GemmsFP16::Row)
AE_SM80_FORWARD_KERNEL(forward_fp16_colmajor, GemmsFP16::Col)

}  // namespace anyexperts::sm80
