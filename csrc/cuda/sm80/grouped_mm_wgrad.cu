// SM80 grouped GEMM for the weight gradient, bf16 and fp16: db[g] = a[rows of g]^T @
// dout[rows of g], a variable-K grouped GEMM with M = K (a's columns), N = N, K = rows of g.
#include "grouped_mm_sm80.cuh"

namespace anyexperts::sm80 {

AE_SM80_WGRAD_KERNEL(wgrad_bf16, detail::WgradGemm<cutlass::bfloat16_t>)
AE_SM80_WGRAD_KERNEL(wgrad_fp16, detail::WgradGemm<cutlass::half_t>)

}  // namespace anyexperts::sm80
