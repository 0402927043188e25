# FindBLIS: locates BLIS (no pkg-config file on Debian) and checks that the OpenMP flavour
# is the one linked. Defines BLIS::BLIS.
find_path(BLIS_INCLUDE_DIR blis.h
  PATH_SUFFIXES x86_64-linux-gnu/blis-openmp blis-openmp blis)
find_library(BLIS_LIBRARY NAMES blis
  PATHS /usr/lib/x86_64-linux-gnu/blis-openmp NO_DEFAULT_PATH)
find_library(BLIS_LIBRARY NAMES blis)

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(BLIS REQUIRED_VARS BLIS_LIBRARY BLIS_INCLUDE_DIR)

if(BLIS_FOUND)
  # The OpenMP flavour is required: our thread policy sets BLIS threads per call.
  get_filename_component(_blis_real "${BLIS_LIBRARY}" REALPATH)
  file(STRINGS "${BLIS_INCLUDE_DIR}/blis.h" _blis_omp REGEX "#define BLIS_ENABLE_OPENMP")
  if(NOT _blis_omp AND NOT _blis_real MATCHES "openmp")
    message(FATAL_ERROR "BLIS at ${_blis_real} is not the OpenMP build; install libblis-openmp-dev")
  endif()
  message(STATUS "BLIS: ${_blis_real} (headers ${BLIS_INCLUDE_DIR})")
  if(NOT TARGET BLIS::BLIS)
    add_library(BLIS::BLIS UNKNOWN IMPORTED)
    set_target_properties(BLIS::BLIS PROPERTIES
      IMPORTED_LOCATION "${BLIS_LIBRARY}"
      INTERFACE_INCLUDE_DIRECTORIES "${BLIS_INCLUDE_DIR}")
  endif()
endif()
mark_as_advanced(BLIS_INCLUDE_DIR BLIS_LIBRARY)
