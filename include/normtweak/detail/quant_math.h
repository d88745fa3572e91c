// Scalar arithmetic of the quantization grid, shared by the CPU code and the
// CUDA kernels (no fmt, no exceptions: this header compiles under nvcc).
#pragma once

#include "normtweak/config.h"

#include <cmath>

namespace normtweak {

struct QuantParams {
  float scale;
  float zero;
};

// Grid for a range [xmin, xmax]; the range is first widened to contain 0.
NT_HOST_DEVICE inline QuantParams params_from_range(float xmin, float xmax, int maxq, bool sym) {
  xmin = xmin < 0.f ? xmin : 0.f;
  xmax = xmax > 0.f ? xmax : 0.f;
  if (sym) {
    const float a = -xmin > xmax ? -xmin : xmax;
    xmax = a;
    if (xmin < 0.f) xmin = -a;
  }
  if (xmin == 0.f && xmax == 0.f) {
    xmin = -1.f;
    xmax = 1.f;
  }
  QuantParams p;
  p.scale = (xmax - xmin) / static_cast<float>(maxq);
  p.zero = sym ? static_cast<float>(maxq + 1) / 2.f : rintf(-xmin / p.scale);
  return p;
}

// Integer code of x on the grid, as a float holding an integer in [0, maxq].
NT_HOST_DEVICE inline float quantize_code(float x, QuantParams p, int maxq) {
  float q = rintf(x / p.scale) + p.zero;
  q = q < 0.f ? 0.f : q;
  return q > static_cast<float>(maxq) ? static_cast<float>(maxq) : q;
}

NT_HOST_DEVICE inline float dequantize_code(float code, QuantParams p) { return p.scale * (code - p.zero); }

NT_HOST_DEVICE inline float fake_quantize(float x, QuantParams p, int maxq) {
  return dequantize_code(quantize_code(x, p, maxq), p);
}

}  // namespace normtweak
