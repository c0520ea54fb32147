# Torch's headers, libraries and C++ ABI, read from the installed `torch` package.
# We do not call find_package(Torch): its CUDA setup probes for a GPU and rewrites the
# arch flags, while this build picks its own archs (cmake/CudaArchs.cmake).
execute_process(
  COMMAND "${Python3_EXECUTABLE}" -c
    "import torch, torch.utils.cpp_extension as c; print(';'.join(c.include_paths())); print(c.library_paths()[0]); print(int(torch._C._GLIBCXX_USE_CXX11_ABI)); print(torch.version.cuda or '-')"
  OUTPUT_VARIABLE _torch_info
  RESULT_VARIABLE _torch_rc
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _torch_rc EQUAL 0)
  message(FATAL_ERROR "Cannot import torch with ${Python3_EXECUTABLE}; install torch first.")
endif()
string(REPLACE "\n" ";" _torch_info "${_torch_info}")
list(GET _torch_info 0 _inc0)
list(GET _torch_info 1 _inc1)
list(GET _torch_info 2 TORCH_LIBRARY_DIR)
list(GET _torch_info 3 TORCH_CXX11_ABI)
list(GET _torch_info 4 TORCH_CUDA_VERSION)
if(TORCH_CUDA_VERSION STREQUAL "-")
  set(TORCH_CUDA_VERSION "")
endif()

# The libstdc++ the torch process runs with (Linux): see CMakeLists.txt for why we link it.
execute_process(
  COMMAND "${Python3_EXECUTABLE}" -c
    "import torch\nfor l in open('/proc/self/maps'):\n    p = l.split()[-1]\n    if '/libstdc++.so' in p:\n        print(p); break"
  OUTPUT_VARIABLE TORCH_LIBSTDCXX
  OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
message(STATUS "libstdc++ of torch: ${TORCH_LIBSTDCXX}")
set(TORCH_INCLUDE_DIRS "${_inc0}" "${_inc1}")

function(_ae_torch_lib var name)
  find_library(${var} NAMES ${name} PATHS "${TORCH_LIBRARY_DIR}" NO_DEFAULT_PATH REQUIRED)
endfunction()
_ae_torch_lib(TORCH_C10_LIB c10)
_ae_torch_lib(TORCH_LIB torch)
_ae_torch_lib(TORCH_CPU_LIB torch_cpu)

add_library(ae_torch INTERFACE)
target_include_directories(ae_torch SYSTEM INTERFACE ${TORCH_INCLUDE_DIRS})
target_compile_definitions(ae_torch INTERFACE _GLIBCXX_USE_CXX11_ABI=${TORCH_CXX11_ABI}
                           TORCH_API_INCLUDE_EXTENSION_H)
target_link_libraries(ae_torch INTERFACE ${TORCH_C10_LIB} ${TORCH_LIB} ${TORCH_CPU_LIB})

if(ANYEXPERTS_CUDA)
  if(TORCH_CUDA_VERSION STREQUAL "")
    message(FATAL_ERROR "ANYEXPERTS_CUDA is on but the installed torch is a CPU-only build.")
  endif()
  _ae_torch_lib(TORCH_C10_CUDA_LIB c10_cuda)
  _ae_torch_lib(TORCH_CUDA_LIB torch_cuda)
  target_link_libraries(ae_torch INTERFACE ${TORCH_C10_CUDA_LIB} ${TORCH_CUDA_LIB})
  target_compile_definitions(ae_torch INTERFACE USE_CUDA)
endif()
