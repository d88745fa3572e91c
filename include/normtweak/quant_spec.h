// QuantSpec: the integer grid a weight matrix is quantized to, and the scalar
// arithmetic of that grid. Semantics follow the reference GPTQ quantizer
// (gptq/quant.py): maxq = 2^bits - 1, the range always contains 0, symmetric
// grids put the zero point at (maxq + 1) / 2, codes are
// clamp(round(x / scale) + zero, 0, maxq) with round-half-to-even (torch.round).
#pragma once

#include "normtweak/config.h"
#include "normtweak/detail/quant_math.h"
#include "normtweak/error.h"

#include <cmath>
#include <cstdint>
#include <limits>

namespace normtweak {

struct QuantSpec {
  int bits = 4;          // 2..8
  // -1: one (scale, zero) per output channel; else groups of this many input
  // columns. When it does not divide in_features the last group is shorter
  // (ceil(in / group_size) groups, as AutoGPTQ/GPTQModel lay them out), which
  // models such as SmolLM2 (in_features 576) need for group_size=128.
  int group_size = -1;
  bool sym = true;       // symmetric grid, zero fixed at (maxq + 1) / 2
  // Clipping search (the reference's `mse` option): shrink [xmin, xmax] by
  // p = 1 - i / mse_grid for i < mse_maxshrink * mse_grid and keep the range
  // with the smallest sum |q - x|^mse_norm.
  bool mse = false;
  float mse_norm = 2.4f;
  int mse_grid = 100;
  float mse_maxshrink = 0.8f;

  int maxq() const { return (1 << bits) - 1; }
  bool grouped() const { return group_size != -1; }

  void validate() const {
    NT_CHECK(bits >= 2 && bits <= 8, "bits={} is not supported; choose 2..8", bits);
    NT_CHECK(group_size == -1 || group_size > 0, "group_size={} is invalid; use -1 (per channel) or a positive size",
             group_size);
    NT_CHECK(!mse || (mse_grid > 0 && mse_maxshrink > 0.f && mse_maxshrink < 1.f && mse_norm > 0.f),
             "clipping search needs mse_grid > 0 (got {}), 0 < mse_maxshrink < 1 (got {}) and mse_norm > 0 (got {})",
             mse_grid, mse_maxshrink, mse_norm);
  }

  void validate_for(std::int64_t in_features) const {
    validate();
    NT_CHECK(in_features > 0, "in_features={} must be positive", in_features);
  }

  std::int64_t num_groups(std::int64_t in_features) const {
    return grouped() ? (in_features + group_size - 1) / group_size : 1;
  }
  // Columns in group g (the last one may be short).
  std::int64_t group_width(std::int64_t g, std::int64_t in_features) const {
    if (!grouped()) return in_features;
    const std::int64_t start = g * group_size;
    return in_features - start < group_size ? in_features - start : group_size;
  }
};

// (scale, zero) for n values x[0], x[stride], ... following `spec`, including
// the optional clipping search.
inline QuantParams find_params(const float* x, std::int64_t n, std::int64_t stride, const QuantSpec& spec) {
  float xmin = 0.f, xmax = 0.f;
  for (std::int64_t i = 0; i < n; ++i) {
    const float v = x[i * stride];
    xmin = v < xmin ? v : xmin;
    xmax = v > xmax ? v : xmax;
  }
  const int maxq = spec.maxq();
  QuantParams best = params_from_range(xmin, xmax, maxq, spec.sym);
  if (!spec.mse) return best;
  // params_from_range widened the range to contain 0 and symmetrised it; the
  // search shrinks that effective range, as the reference does.
  float lo = xmin < 0.f ? xmin : 0.f, hi = xmax > 0.f ? xmax : 0.f;
  if (spec.sym) {
    const float a = -lo > hi ? -lo : hi;
    hi = a;
    if (lo < 0.f) lo = -a;
  }
  if (lo == 0.f && hi == 0.f) return best;
  float best_err = std::numeric_limits<float>::infinity();
  const int steps = static_cast<int>(spec.mse_maxshrink * static_cast<float>(spec.mse_grid));
  for (int i = 0; i < steps; ++i) {
    const float p = 1.f - static_cast<float>(i) / static_cast<float>(spec.mse_grid);
    const float lo1 = p * lo, hi1 = p * hi;
    QuantParams c;
    c.scale = (hi1 - lo1) / static_cast<float>(maxq);
    c.zero = spec.sym ? best.zero : rintf(-lo1 / c.scale);
    float err = 0.f;
    for (std::int64_t j = 0; j < n; ++j) {
      const float v = x[j * stride];
      err += std::pow(std::fabs(fake_quantize(v, c, maxq) - v), spec.mse_norm);
    }
    if (err < best_err) {
      best_err = err;
      best = c;
    }
  }
  return best;
}

}  // namespace normtweak
