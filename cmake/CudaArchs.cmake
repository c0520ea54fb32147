# ANYEXPERTS_CUDA_ARCHS: semicolon list of compute capabilities, e.g. "80;90a" (default).
# Routing kernels build for every listed arch (plus PTX of the last one, for newer GPUs);
# the CUTLASS SM90 grouped GEMM builds only when 90a is listed, since wgmma and TMA need it.
set(ANYEXPERTS_CUDA_ARCHS "80;90a" CACHE STRING "CUDA archs to build for")

set(AE_GENCODE_ALL "")
foreach(arch IN LISTS ANYEXPERTS_CUDA_ARCHS)
  list(APPEND AE_GENCODE_ALL "-gencode=arch=compute_${arch},code=sm_${arch}")
endforeach()
list(GET ANYEXPERTS_CUDA_ARCHS -1 _last_arch)
list(APPEND AE_GENCODE_ALL "-gencode=arch=compute_${_last_arch},code=compute_${_last_arch}")

list(FIND ANYEXPERTS_CUDA_ARCHS "90a" _has_sm90a)
set(AE_BUILD_SM90 OFF)
if(_has_sm90a GREATER -1)
  set(AE_BUILD_SM90 ON)
endif()
set(AE_GENCODE_SM90 "-gencode=arch=compute_90a,code=sm_90a")
