# CUTLASS headers: $CUTLASS_DIR if set (a CUTLASS checkout or install, holding include/),
# else the headers shipped inside the `nvidia-cutlass` pip package.
if(DEFINED ENV{CUTLASS_DIR})
  set(CUTLASS_ROOT "$ENV{CUTLASS_DIR}")
else()
  execute_process(
    COMMAND "${Python3_EXECUTABLE}" -c
      "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source'))"
    OUTPUT_VARIABLE CUTLASS_ROOT
    RESULT_VARIABLE _cutlass_rc
    OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  if(NOT _cutlass_rc EQUAL 0)
    message(FATAL_ERROR "CUTLASS headers not found: `pip install --no-deps nvidia-cutlass` "
                        "or set CUTLASS_DIR to a CUTLASS checkout.")
  endif()
endif()
if(NOT EXISTS "${CUTLASS_ROOT}/include/cutlass/cutlass.h")
  message(FATAL_ERROR "No CUTLASS headers under ${CUTLASS_ROOT}/include")
endif()
message(STATUS "CUTLASS: ${CUTLASS_ROOT}")
add_library(ae_cutlass INTERFACE)
target_include_directories(ae_cutlass SYSTEM INTERFACE "${CUTLASS_ROOT}/include"
                                                      "${CUTLASS_ROOT}/tools/util/include")
