# Dependencies of normtweak, shared by the build and by the installed package
# config (so that find_package(normtweak) finds the same things).
include(CMakeFindDependencyMacro)

if(NOT DEFINED NORMTWEAK_USE_BLAS)
  set(NORMTWEAK_USE_BLAS ON)
endif()

find_package(Eigen3 3.3 REQUIRED NO_MODULE)
find_package(fmt REQUIRED)
find_package(OpenMP COMPONENTS CXX)

find_path(NORMTWEAK_DLPACK_INCLUDE_DIR dlpack/dlpack.h)
if(NOT NORMTWEAK_DLPACK_INCLUDE_DIR)
  message(FATAL_ERROR "dlpack/dlpack.h not found: install libdlpack-dev (Debian) or set NORMTWEAK_DLPACK_INCLUDE_DIR")
endif()

set(NORMTWEAK_BLAS_IS_OPENBLAS OFF)
if(NORMTWEAK_USE_BLAS)
  set(BLA_VENDOR OpenBLAS)
  find_package(BLAS)
  if(BLAS_FOUND)
    set(NORMTWEAK_BLAS_IS_OPENBLAS ON)
  else()
    unset(BLA_VENDOR)
    find_package(BLAS REQUIRED)
  endif()
  find_package(LAPACK REQUIRED)
endif()

function(normtweak_link_deps target scope)
  target_link_libraries(${target} ${scope} Eigen3::Eigen fmt::fmt)
  # Eigen's heap alignment must agree between translation units compiled with
  # different -march flags (the library uses -march=native, a consumer may
  # not), or a matrix freed in one of them was allocated with another layout.
  target_compile_definitions(${target} ${scope} EIGEN_MAX_ALIGN_BYTES=64)
  target_include_directories(${target} SYSTEM ${scope} ${NORMTWEAK_DLPACK_INCLUDE_DIR})
  if(OpenMP_CXX_FOUND)
    target_link_libraries(${target} ${scope} OpenMP::OpenMP_CXX)
  endif()
  if(NORMTWEAK_USE_BLAS)
    target_link_libraries(${target} ${scope} LAPACK::LAPACK BLAS::BLAS)
    target_compile_definitions(${target} ${scope} NORMTWEAK_USE_BLAS)
    if(NORMTWEAK_BLAS_IS_OPENBLAS)
      target_compile_definitions(${target} ${scope} NORMTWEAK_OPENBLAS)
    endif()
  endif()
endfunction()
