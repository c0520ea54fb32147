// Interface of the SIMT grouped GEMMs (csrc/cuda/grouped_mm_simt.cu): the path of
// grouped_mm / grouped_mm_wgrad for every call no tensor-core path takes (tensor_core_path
// in csrc/cuda/grouped_mm.cu: GPUs older than sm_80, fp32/fp64, K or N not a multiple of 8
// or past int range, builds without those kernels, the backend override). Any strides;
// slow but exact to the contract; the dispatcher has checked the inputs.
#pragma once

#include <ATen/core/Tensor.h>

namespace anyexperts::simt {

// out[r] = a[r] @ b[g(r)] for the rows of every group; rows at or after the last group end
// are zero, or left unwritten when !zero_tail. Fp32 accumulation (fp64 for fp64).
void grouped_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets,
                bool zero_tail, at::Tensor& out);

// db[g] = a[rows of g]^T @ dout[rows of g]; zeros for empty groups.
void grouped_mm_wgrad(const at::Tensor& a, const at::Tensor& dout, const at::Tensor& offsets,
                      at::Tensor& db);

}  // namespace anyexperts::simt
