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
// the optional clipping search (the arithmetic is find_params_raw(), which the
// CUDA kernels share).
inline QuantParams find_params(const float* x, std::int64_t n, std::int64_t stride, const QuantSpec& spec) {
  return find_params_raw(x, n, stride, spec.maxq(), spec.sym,
                         spec.mse ? ClipSearch{spec.mse_norm, spec.mse_grid, spec.mse_maxshrink} : ClipSearch{});
}

}  // namespace normtweak
