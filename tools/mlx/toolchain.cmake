# CMake toolchain file for mlx-sys's build of mlx-c on Linux (the `cmake` crate passes it through
# CMAKE_TOOLCHAIN_FILE_x86_64-unknown-linux-gnu, set in .cargo/config.toml).
# - Use the prebuilt MLX 0.32.2 from vendor/mlx-cpu (scripts/setup-mlx.sh) instead of fetching
#   MLX from GitHub (CMAKE_PREFIX_PATH_x86_64-unknown-linux-gnu, also set in .cargo/config.toml,
#   points at it).
# - Skip mlx-c's examples.
# - Force-include modelpool_mlx_compat.h into mlx-c's C++ (see that file for why).
# On other systems (macOS) it changes nothing, so mlx-sys's normal build runs.
if(CMAKE_HOST_SYSTEM_NAME STREQUAL "Linux")
  set(MLX_C_USE_SYSTEM_MLX ON CACHE BOOL "use the MLX from vendor/mlx-cpu" FORCE)
  set(MLX_C_BUILD_EXAMPLES OFF CACHE BOOL "no mlx-c examples" FORCE)
  set(CMAKE_PROJECT_INCLUDE "${CMAKE_CURRENT_LIST_DIR}/project-include.cmake"
      CACHE FILEPATH "modelpool compat hook" FORCE)
endif()
