// Scalar arithmetic of the quantization grid, shared by the CPU code and the
// CUDA kernels (no fmt, no exceptions: this header compiles under nvcc).
#pragma once

#include "normtweak/config.h"

#include <cmath>
#include <cstdint>

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

// The clipping search (the GPTQ reference's `mse` option); grid = 0 turns it off.
struct ClipSearch {
  float norm = 2.4f;
  int grid = 0;
  float maxshrink = 0.8f;
};

// (scale, zero) for n values x[0], x[stride], ...: the range widened to contain
// 0, then (with a clipping search) shrunk by p = 1 - i / grid for
// i < maxshrink * grid, keeping the range with the smallest sum |q - x|^norm.
NT_HOST_DEVICE inline QuantParams find_params_raw(const float* x, std::int64_t n, std::int64_t stride, int maxq,
                                                  bool sym, ClipSearch clip) {
  float xmin = 0.f, xmax = 0.f;
  for (std::int64_t i = 0; i < n; ++i) {
    const float v = x[i * stride];
    xmin = v < xmin ? v : xmin;
    xmax = v > xmax ? v : xmax;
  }
  QuantParams best = params_from_range(xmin, xmax, maxq, sym);
  if (clip.grid <= 0) return best;
  // params_from_range widened the range to contain 0 and symmetrised it; the
  // search shrinks that effective range, as the reference does.
  float lo = xmin < 0.f ? xmin : 0.f, hi = xmax > 0.f ? xmax : 0.f;
  if (sym) {
    const float a = -lo > hi ? -lo : hi;
    hi = a;
    if (lo < 0.f) lo = -a;
  }
  if (lo == 0.f && hi == 0.f) return best;
  float best_err = HUGE_VALF;
  const int steps = static_cast<int>(clip.maxshrink * static_cast<float>(clip.grid));
  for (int i = 0; i < steps; ++i) {
    const float p = 1.f - static_cast<float>(i) / static_cast<float>(clip.grid);
    const float lo1 = p * lo, hi1 = p * hi;
    QuantParams c;
    c.scale = (hi1 - lo1) / static_cast<float>(maxq);
    c.zero = sym ? best.zero : rintf(-lo1 / c.scale);
    float err = 0.f;
    for (std::int64_t j = 0; j < n; ++j) {
      const float v = x[j * stride];
      err += powf(fabsf(fake_quantize(v, c, maxq) - v), clip.norm);
    }
    if (err < best_err) {
      best_err = err;
      best = c;
    }
  }
  return best;
}

}  // namespace normtweak
