// The op schemas of torch.ops.anyexperts, in one place (DESIGN.md section 3). The CPU and
// CUDA kernels register their implementations in csrc/cpu and csrc/cuda; fake (meta)
// implementations and autograd live beside the Python wrappers in anyexperts_ops/ops.py.
//
// zero_tail / zero_unreferenced (keyword-only, default true: the DESIGN.md contract) let a
// caller that never reads the rows past the last group skip writing them; README, "Dead
// rows".
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import anyexperts_ops._C` loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(anyexperts, m) {
  m.def(
      "segmented_topk(Tensor logits, Tensor slots, Tensor max_virtual, int k_max, int num_real, "
      "str norm) -> (Tensor ids, Tensor weights)");
  m.def(
      "segmented_topk_backward(Tensor grad_weights, Tensor logits, Tensor ids, int num_real, "
      "str norm) -> Tensor");
  m.def(
      "permute(Tensor x, Tensor ids, int num_real, int align, *, bool zero_tail=True) -> "
      "(Tensor x_perm, Tensor offsets, Tensor slot_rows)");
  m.def("grouped_mm(Tensor a, Tensor b, Tensor offsets, *, bool zero_tail=True) -> Tensor");
  m.def("grouped_mm_wgrad(Tensor a, Tensor dout, Tensor offsets) -> Tensor");
  m.def("swiglu(Tensor gu, Tensor offsets, *, bool zero_tail=True) -> Tensor");
  m.def(
      "swiglu_backward(Tensor grad_h, Tensor gu, Tensor offsets, *, bool zero_tail=True) -> "
      "Tensor");
  m.def("hsm(Tensor x, Tensor a) -> Tensor");
  m.def("hsm_backward(Tensor grad, Tensor x, Tensor a) -> (Tensor grad_x, Tensor grad_a)");
  m.def(
      "unpermute(Tensor y, Tensor slot_rows, Tensor weights, *, bool zero_unreferenced=True) "
      "-> Tensor");
  m.def(
      "unpermute_backward(Tensor grad_out, Tensor y, Tensor slot_rows, Tensor weights, *, "
      "bool zero_unreferenced=True) -> (Tensor grad_y, Tensor grad_weights)");
  m.def(
      "add_virtual(Tensor out, Tensor x, Tensor ids, Tensor weights, int num_real, "
      "Tensor sources, Tensor const_vectors) -> Tensor");
  m.def(
      "add_virtual_backward(Tensor grad, Tensor x, Tensor ids, Tensor weights, int num_real, "
      "Tensor sources, Tensor const_vectors) -> (Tensor grad_x, Tensor grad_weights)");
}
