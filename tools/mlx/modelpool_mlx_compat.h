/*
 * Compatibility header for building mlx-c 0.7.0 (vendored in the mlx-sys crate) on Linux x86_64.
 * It is force-included into mlx-c's C++ sources (by toolchain.cmake) and into bindgen's parse of
 * the mlx-c headers (by BINDGEN_EXTRA_CLANG_ARGS_x86_64-unknown-linux-gnu in .cargo/config.toml,
 * which finds it through C_INCLUDE_PATH: hence a name no other project uses). It does nothing on
 * aarch64, where mlx-c's own half.h is right.
 *
 * 1. mlx-c's half.h defines float16_t/bfloat16_t only on ARM, so on x86_64 the f16/bf16
 *    functions mlx-rs calls (mlx_array_item_float16, ...) vanish. We claim half.h's include
 *    guard and define both as 16-bit types. For bindgen (clang, C) float16_t is `__fp16`, which
 *    bindgen renders as `__BindgenFloat16(u16)`, the type mlx-rs expects; bfloat16_t must be a
 *    plain u16 for mlx-rs. In the C++ build both are raw 16-bit storage.
 * 2. mlx-c uses std::format, which GCC 12's libstdc++ lacks. We provide a minimal one that
 *    handles plain `{}` placeholders: all that mlx-c uses.
 */
#ifndef MODELPOOL_MLX_COMPAT_H
#define MODELPOOL_MLX_COMPAT_H

#if !defined(__aarch64__)
#define MLX_HALF_H 1
#define HAS_FLOAT16 1
#define HAS_BFLOAT16 1
#if defined(__clang__) && !defined(__cplusplus)
typedef __fp16 float16_t;
#else
typedef unsigned short float16_t;
#endif
typedef unsigned short bfloat16_t;
#endif /* !__aarch64__ */

#if defined(__cplusplus) && defined(__has_include)
#if __has_include(<format>)
#include <format>
#endif
#if !defined(__cpp_lib_format)
#include <sstream>
#include <string>
#include <string_view>
namespace std {
namespace modelpool_compat {
inline void format_rest(std::ostringstream& out, std::string_view fmt) {
  out << fmt;
}
template <typename T, typename... Rest>
void format_rest(std::ostringstream& out, std::string_view fmt, const T& value,
                 const Rest&... rest) {
  auto pos = fmt.find("{}");
  if (pos == std::string_view::npos) {
    out << fmt;
    return;
  }
  out << fmt.substr(0, pos) << value;
  format_rest(out, fmt.substr(pos + 2), rest...);
}
} // namespace modelpool_compat
template <typename... Args>
std::string format(std::string_view fmt, const Args&... args) {
  std::ostringstream out;
  modelpool_compat::format_rest(out, fmt, args...);
  return out.str();
}
} // namespace std
#endif /* !__cpp_lib_format */
#endif /* __cplusplus */

#endif /* MODELPOOL_MLX_COMPAT_H */
