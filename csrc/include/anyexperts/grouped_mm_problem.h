// The problems the grouped GEMM kernels solve, as raw pointers and strides in elements:
// shared by the CUTLASS 3.x SM90 kernels (grouped_mm_sm90.h) and the CUTLASS 2.x SM80
// kernels (grouped_mm_sm80.h). Free of Torch and CUTLASS: the dispatcher
// (csrc/cuda/grouped_mm.cu) fills them after checking dtypes, devices, shapes and 16-byte
// alignment (base pointers and leading dimensions).
#pragma once

#include <cstdint>

namespace anyexperts::grouped {

// Layout of b[g] (a K x N matrix) in memory.
enum class BLayout : int {
  kRowMajor = 0,  // b[g][k][n] at k*ldb + n  ([G,K,N] storage)
  kColMajor = 1,  // b[g][k][n] at n*ldb + k  (transposed view of [G,N,K] storage, nn.Linear)
};

// out[rows of g] = a[rows of g] @ b[g] (forward, and dgrad with b transposed).
struct ForwardProblem {
  const void* a;          // a[R,K], element (r,k) at r*lda + k
  int64_t lda;
  const void* b;          // b[G,K,N], see BLayout; group g starts at b + g*b_group_stride
  int64_t ldb;
  int64_t b_group_stride;
  BLayout layout;         // which of the two compiled kernels must run it
  void* out;              // out[R,N], contiguous (ld = N)
  const int32_t* offsets; // [G] end offsets, device memory
  int64_t groups;         // G >= 1
  int64_t rows;           // R >= 1
  int64_t k;              // K >= 1, multiple of 8
  int64_t n;              // N >= 1, multiple of 8
  bool zero_tail;         // zero rows [end of group G-1, R); false leaves them unwritten
};

// db[g] = a[rows of g]^T @ dout[rows of g] (weight gradient, variable-K grouped GEMM).
struct WgradProblem {
  const void* a;          // a[R,K], element (r,k) at r*lda + k
  int64_t lda;
  const void* dout;       // dout[R,N], element (r,n) at r*ldd + n
  int64_t ldd;
  void* db;               // db[G,K,N], contiguous
  const int32_t* offsets;
  int64_t groups;
  int64_t rows;
  int64_t k;              // multiple of 8
  int64_t n;              // multiple of 8
  bool largest_first;     // problems by group rows descending (wgrad_slot), else in index order
};

}  // namespace anyexperts::grouped
