// Reading typed views into working buffers.
#pragma once

#include "normtweak/detail/half.h"
#include "normtweak/tensor_view.h"

#include <cmath>
#include <cstdint>

namespace normtweak::detail {

template <typename T>
inline T load_as(const void* base, dtype t, std::int64_t offset) {
  switch (t) {
    case dtype::f32: return static_cast<T>(static_cast<const float*>(base)[offset]);
    case dtype::f64: return static_cast<T>(static_cast<const double*>(base)[offset]);
    case dtype::f16: return static_cast<T>(f16_to_float(static_cast<const std::uint16_t*>(base)[offset]));
    case dtype::bf16: return static_cast<T>(bf16_to_float(static_cast<const std::uint16_t*>(base)[offset]));
    case dtype::i32: return static_cast<T>(static_cast<const std::int32_t*>(base)[offset]);
    case dtype::u8: return static_cast<T>(static_cast<const std::uint8_t*>(base)[offset]);
  }
  return T(0);
}

// Copy rows [r0, r0 + nrows) of the 2-D view `v` into dst (row-major, ld =
// v.size(1)), converting to T. Returns the number of non-finite values seen.
template <typename T>
inline std::int64_t copy_rows(const TensorView& v, std::int64_t r0, std::int64_t nrows, T* dst) {
  const std::int64_t cols = v.size(1), rs = v.stride(0), cs = v.stride(1);
  std::int64_t bad = 0;
  for (std::int64_t r = 0; r < nrows; ++r) {
    T* out = dst + r * cols;
    const std::int64_t base = (r0 + r) * rs;
    if (v.type() == dtype_of<T>::value && cs == 1) {
      const T* in = static_cast<const T*>(v.data()) + base;
      for (std::int64_t c = 0; c < cols; ++c) {
        out[c] = in[c];
        bad += !std::isfinite(in[c]);
      }
    } else {
      for (std::int64_t c = 0; c < cols; ++c) {
        out[c] = load_as<T>(v.data(), v.type(), base + c * cs);
        bad += !std::isfinite(out[c]);
      }
    }
  }
  return bad;
}

}  // namespace normtweak::detail
