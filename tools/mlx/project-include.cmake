# Included by CMake after mlx-c's project() (CMAKE_PROJECT_INCLUDE, set by toolchain.cmake):
# force-include modelpool_mlx_compat.h into every C++ translation unit of mlx-c (GCC and clang
# accept the joined `-include<file>` form).
add_compile_options("$<$<COMPILE_LANGUAGE:CXX>:-include${CMAKE_CURRENT_LIST_DIR}/modelpool_mlx_compat.h>")
