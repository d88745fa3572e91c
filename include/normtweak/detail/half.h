// float16 / bfloat16 <-> float32 conversions as plain bit manipulation, usable
// on the host and in CUDA kernels. Round-to-nearest-even, like torch's casts.
#pragma once

#include "normtweak/config.h"

#include <cstdint>
#include <cstring>

namespace normtweak::detail {

NT_HOST_DEVICE inline float bits_to_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
NT_HOST_DEVICE inline std::uint32_t float_to_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

NT_HOST_DEVICE inline float bf16_to_float(std::uint16_t h) { return bits_to_float(static_cast<std::uint32_t>(h) << 16); }

NT_HOST_DEVICE inline std::uint16_t float_to_bf16(float f) {
  std::uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>(u >> 16);
}

NT_HOST_DEVICE inline float f16_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  std::uint32_t exp = (h >> 10) & 0x1fu;
  std::uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf / nan
  if (exp == 0) {
    if (mant == 0) return bits_to_float(sign);
    // subnormal: value = mant * 2^-24
    float v = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

NT_HOST_DEVICE inline std::uint16_t float_to_f16(float f) {
  std::uint32_t u = float_to_bits(f);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u);  // nan
  if (u >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // overflow -> inf (>= 65520)
  if (u < 0x38800000u) {                                                  // subnormal or zero in f16
    // value * 2^24 rounded to nearest even gives the subnormal mantissa.
    const float v = bits_to_float(u) * 16777216.0f;
    float r = v + 12582912.0f;  // 1.5 * 2^23 forces rounding to an integer (nearest even)
    std::uint32_t m = float_to_bits(r) - float_to_bits(12582912.0f);
    return static_cast<std::uint16_t>(sign | m);
  }
  std::uint32_t rounded = u + 0xfffu + ((u >> 13) & 1u);
  return static_cast<std::uint16_t>(sign | ((rounded - 0x38000000u) >> 13));
}

}  // namespace normtweak::detail
