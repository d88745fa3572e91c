// NormTweaker: Adam (Kingma & Ba 2015) over a block's norm parameters only,
// with the paper's per-layer learning rate (eq. 3)
//
//   lr_i = lr0 * (1 + scale * i / L)
//
// for block i of L. The caller computes gradients (ChannelDistLoss backward
// through the quantized block, norm_backward for the norm parameters) and
// calls step(); parameters are updated in place through their views, so a
// torch Parameter handed over by DLPack changes without a copy.
#pragma once

#include "normtweak/tensor_view.h"

#include <cmath>
#include <cstdint>
#include <vector>

namespace normtweak {

struct TweakConfig {
  double lr0 = 1e-5;     // paper §Settings: grid-searched, starting at 1e-5
  double scale = 5.0;    // eq. 3
  int passes = 1;        // passes over the calibration set (paper Table 6: 1 is best)
  double beta1 = 0.9, beta2 = 0.999, adam_eps = 1e-8;

  void validate() const {
    NT_CHECK(lr0 > 0.0 && std::isfinite(lr0), "tweak lr={} must be positive", lr0);
    NT_CHECK(scale >= 0.0 && std::isfinite(scale), "tweak scale={} must be non-negative", scale);
    NT_CHECK(passes >= 1, "tweak passes={} must be at least 1", passes);
    NT_CHECK(beta1 >= 0.0 && beta1 < 1.0 && beta2 >= 0.0 && beta2 < 1.0, "Adam betas ({}, {}) must lie in [0, 1)",
             beta1, beta2);
  }
};

class NormTweaker {
 public:
  NormTweaker(TweakConfig cfg, int num_layers) : cfg_(cfg), num_layers_(num_layers) {
    cfg_.validate();
    NT_CHECK(num_layers >= 1, "num_layers={} must be at least 1", num_layers);
  }

  double lr(int layer) const {
    NT_CHECK(layer >= 0 && layer < num_layers_, "layer {} outside [0, {})", layer, num_layers_);
    return cfg_.lr0 * (1.0 + cfg_.scale * static_cast<double>(layer) / static_cast<double>(num_layers_));
  }

  // Start a block: the float32 parameter views to train; Adam state is reset.
  void begin_layer(int layer, std::vector<TensorView> params) {
    lr_ = lr(layer);
    params_ = std::move(params);
    m_.clear();
    v_.clear();
    for (const TensorView& p : params_) {
      require_cpu(p, "norm parameter");
      require_dtype(p, dtype::f32, "norm parameter");
      require_contiguous(p, "norm parameter");
      m_.emplace_back(static_cast<std::size_t>(p.numel()), 0.0f);
      v_.emplace_back(static_cast<std::size_t>(p.numel()), 0.0f);
    }
    step_ = 0;
  }

  // One Adam step; grads[i] matches params[i] in size (float32).
  void step(const std::vector<TensorView>& grads) {
    NT_CHECK(grads.size() == params_.size(), "got {} gradients for {} parameters", grads.size(), params_.size());
    ++step_;
    const double bc1 = 1.0 - std::pow(cfg_.beta1, step_), bc2 = 1.0 - std::pow(cfg_.beta2, step_);
    const float b1 = static_cast<float>(cfg_.beta1), b2 = static_cast<float>(cfg_.beta2);
    const float step_size = static_cast<float>(lr_ / bc1);
    const float inv_sqrt_bc2 = static_cast<float>(1.0 / std::sqrt(bc2));
    const float eps = static_cast<float>(cfg_.adam_eps);
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const TensorView& g = grads[i];
      require_dtype(g, dtype::f32, "gradient");
      require_contiguous(g, "gradient");
      NT_CHECK(g.numel() == params_[i].numel(), "gradient {} has {} elements, parameter has {}", i, g.numel(),
               params_[i].numel());
      float* p = params_[i].data_as<float>();
      const float* gp = g.data_as<const float>();
      float* m = m_[i].data();
      float* v = v_[i].data();
      for (std::int64_t k = 0; k < g.numel(); ++k) {
        NT_CHECK(std::isfinite(gp[k]), "non-finite gradient {} at index {} of parameter {}; lower --tweak-lr", gp[k], k,
                 i);
        m[k] = b1 * m[k] + (1.f - b1) * gp[k];
        v[k] = b2 * v[k] + (1.f - b2) * gp[k] * gp[k];
        // torch.optim.Adam: p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)
        p[k] -= step_size * m[k] / (std::sqrt(v[k]) * inv_sqrt_bc2 + eps);
      }
    }
  }

  double current_lr() const { return lr_; }
  int steps() const { return step_; }
  const TweakConfig& config() const { return cfg_; }

 private:
  TweakConfig cfg_;
  int num_layers_;
  double lr_ = 0.0;
  int step_ = 0;
  std::vector<TensorView> params_;
  std::vector<std::vector<float>> m_, v_;
};

}  // namespace normtweak
