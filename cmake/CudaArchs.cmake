# ANYEXPERTS_CUDA_ARCHS: semicolon list of compute capabilities, e.g. "80;90a" (default).
# Routing kernels build for every listed arch, plus PTX of the last one without its "a"
# (arch-specific PTX such as compute_90a runs on that arch only), which newer GPUs compile
# at load time. The CUTLASS 2.x SM80 grouped GEMM builds for the listed archs >= 80, plus
# PTX of the lowest of them (tensor-core mma.sync runs on every GPU since Ampere). The
# CUTLASS 3.x SM90 grouped GEMM builds only when 90a is listed, since wgmma and TMA need it.
set(ANYEXPERTS_CUDA_ARCHS "80;90a" CACHE STRING "CUDA archs to build for")

function(ae_arch_number arch out)
  string(REGEX MATCH "^[0-9]+" num "${arch}")
  set(${out} "${num}" PARENT_SCOPE)
endfunction()

set(AE_GENCODE_ALL "")
set(AE_GENCODE_SM80 "")
set(_sm80_ptx "")
foreach(arch IN LISTS ANYEXPERTS_CUDA_ARCHS)
  list(APPEND AE_GENCODE_ALL "-gencode=arch=compute_${arch},code=sm_${arch}")
  ae_arch_number("${arch}" _num)
  if(_num GREATER_EQUAL 80)
    list(APPEND AE_GENCODE_SM80 "-gencode=arch=compute_${arch},code=sm_${arch}")
    if(NOT _sm80_ptx OR _num LESS _sm80_ptx)
      set(_sm80_ptx "${_num}")
    endif()
  endif()
endforeach()
list(GET ANYEXPERTS_CUDA_ARCHS -1 _last_arch)
ae_arch_number("${_last_arch}" _last_num)
list(APPEND AE_GENCODE_ALL "-gencode=arch=compute_${_last_num},code=compute_${_last_num}")

set(AE_BUILD_SM80 OFF)
if(_sm80_ptx)
  set(AE_BUILD_SM80 ON)
  list(APPEND AE_GENCODE_SM80 "-gencode=arch=compute_${_sm80_ptx},code=compute_${_sm80_ptx}")
endif()

list(FIND ANYEXPERTS_CUDA_ARCHS "90a" _has_sm90a)
set(AE_BUILD_SM90 OFF)
if(_has_sm90a GREATER -1)
  set(AE_BUILD_SM90 ON)
endif()
set(AE_GENCODE_SM90 "-gencode=arch=compute_90a,code=sm_90a")
