// Bodies of ActAbsMax, smooth_factors and Quantizer<SmoothQuant>::quantize. Included by
// src/smoothquant.cpp, or by smoothquant.h when NORMTWEAK_HEADER_ONLY is defined.
#pragma once

#include "normtweak/detail/convert.h"
#include "normtweak/detail/quantizer-inl.h"
#include "normtweak/smoothquant.h"
#include "normtweak/threading.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace normtweak {

NORMTWEAK_FUNC ActAbsMax::ActAbsMax(std::int64_t channels) {
  NT_CHECK(channels > 0, "ActAbsMax needs channels > 0, got {}", channels);
  absmax_.assign(static_cast<std::size_t>(channels), 0.0f);
}

NORMTWEAK_FUNC void ActAbsMax::add_batch(const TensorView& Xin) {
  require_cpu(Xin, "X");
  require_floating(Xin, "X");
  const std::int64_t n = channels();
  NT_CHECK(Xin.rank() >= 1 && Xin.size(-1) == n,
           "X has shape {} but the layer has in_features={}; pass activations of shape [..., {}]", Xin.shape_str(), n,
           n);
  const TensorView X = Xin.flatten_2d("X");
  const std::int64_t t = X.size(0);
  if (t == 0) return;
  // Rows are converted to float in chunks; each thread keeps its own maxima
  // and they are merged at the end (max is exact in any order).
  const std::int64_t chunk = std::max<std::int64_t>(1, std::min<std::int64_t>(t, (1 << 20) / n));
  const std::int64_t nchunks = (t + chunk - 1) / chunk;
  const int T = static_cast<int>(std::min<std::int64_t>(num_threads(), nchunks));
  std::vector<std::vector<float>> local(static_cast<std::size_t>(T), std::vector<float>(static_cast<std::size_t>(n), 0.f));
  std::vector<std::int64_t> bad(static_cast<std::size_t>(T), 0);
#pragma omp parallel num_threads(T)
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num();
#else
    const int tid = 0;
#endif
    std::vector<float> buf(static_cast<std::size_t>(chunk * n));
    float* mx = local[static_cast<std::size_t>(tid)].data();
#pragma omp for schedule(static)
    for (std::int64_t c = 0; c < nchunks; ++c) {
      const std::int64_t r0 = c * chunk, rows = std::min(chunk, t - r0);
      bad[static_cast<std::size_t>(tid)] += detail::copy_rows<float>(X, r0, rows, buf.data());
      for (std::int64_t r = 0; r < rows; ++r) {
        const float* x = buf.data() + r * n;
        for (std::int64_t j = 0; j < n; ++j) mx[j] = std::max(mx[j], std::fabs(x[j]));
      }
    }
  }
  std::int64_t nbad = 0;
  for (auto b : bad) nbad += b;
  NT_CHECK(nbad == 0, "calibration activations X contain {} NaN/Inf values (batch of {} tokens); the model produces "
           "non-finite activations on this input", nbad, t);
  for (const auto& mx : local)
    for (std::int64_t j = 0; j < n; ++j) absmax_[j] = std::max(absmax_[j], mx[j]);
  tokens_ += t;
}

NORMTWEAK_FUNC void ActAbsMax::reset() {
  std::fill(absmax_.begin(), absmax_.end(), 0.0f);
  tokens_ = 0;
}

NORMTWEAK_FUNC std::vector<float> smooth_factors(const TensorView& act_absmax, const std::vector<TensorView>& weights,
                                                 float alpha) {
  NT_CHECK(std::isfinite(alpha) && alpha >= 0.0f && alpha <= 1.0f,
           "SmoothQuant alpha={} must lie in [0, 1] (--alpha; 0.5 is the paper's default)", alpha);
  require_cpu(act_absmax, "act_absmax");
  NT_CHECK(act_absmax.rank() == 1 && act_absmax.type() == dtype::f32,
           "act_absmax must be a float32 vector [in_features], got {} of shape {}", dtype_name(act_absmax.type()),
           act_absmax.shape_str());
  NT_CHECK(!weights.empty(), "smooth_factors needs at least one weight matrix that reads the smoothed input");
  const std::int64_t n = act_absmax.size(0);
  std::vector<float> w(static_cast<std::size_t>(n), 0.0f);
  for (std::size_t k = 0; k < weights.size(); ++k) {
    const TensorView& W = weights[k];
    require_rank(W, 2, "W");
    require_cpu(W, "W");
    require_floating(W, "W");
    NT_CHECK(W.size(1) == n, "weight {} has shape {} but the activations have {} channels; every W must be "
             "[out, {}]", k, W.shape_str(), n, n);
    std::vector<float> row(static_cast<std::size_t>(n));
    for (std::int64_t r = 0; r < W.size(0); ++r) {
      NT_CHECK(detail::copy_rows<float>(W, r, 1, row.data()) == 0, "weight {} contains NaN/Inf (row {})", k, r);
      for (std::int64_t j = 0; j < n; ++j) w[j] = std::max(w[j], std::fabs(row[j]));
    }
  }
  // The reference clamps both maxima at 1e-5 so that a dead channel (a = 0)
  // or an unused input column (w = 0) gives a finite factor.
  constexpr float eps = 1e-5f;
  const float* a = act_absmax.data_as<const float>();
  std::vector<float> s(static_cast<std::size_t>(n));
  for (std::int64_t j = 0; j < n; ++j) {
    NT_CHECK(std::isfinite(a[j]) && a[j] >= 0.0f, "act_absmax[{}]={} is not a finite non-negative maximum", j, a[j]);
    const double sj = std::pow(static_cast<double>(std::max(a[j], eps)), alpha) /
                      std::pow(static_cast<double>(std::max(w[j], eps)), 1.0 - alpha);
    s[j] = static_cast<float>(std::max(sj, static_cast<double>(eps)));
  }
  return s;
}

namespace detail {

// RTN on W diag(s): the weights of a smoothed layer.
inline QuantResult quantize_impl(SmoothQuant, const QuantSpec& spec, const SmoothQuant::config& cfg,
                                 const TensorView& Wv, const TensorView& S) {
  RowMatrix<float> W = load_weights(Wv, cfg.layer_name);
  const std::int64_t n = W.cols();
  require_cpu(S, "s");
  NT_CHECK(S.rank() == 1 && S.size(0) == n && S.type() == dtype::f32,
           "SmoothQuant factors s of layer '{}' must be a float32 vector [{}], got {} of shape {}",
           layer_label(cfg.layer_name), n, dtype_name(S.type()), S.shape_str());
  std::vector<float> s(static_cast<std::size_t>(n));
  for (std::int64_t j = 0; j < n; ++j) {
    s[j] = S.data_as<const float>()[j * S.stride(0)];
    NT_CHECK(std::isfinite(s[j]) && s[j] > 0.0f, "SmoothQuant factor s[{}]={} of layer '{}' is not positive and finite",
             j, s[j], layer_label(cfg.layer_name));
  }
  for (std::int64_t r = 0; r < W.rows(); ++r)
    for (std::int64_t j = 0; j < n; ++j) W(r, j) *= s[j];
  QuantResult res = quantize_impl(RTN{}, spec, RTN::config{cfg.layer_name}, TensorView::of(W.data(), {W.rows(), n}),
                                  TensorView());
  res.method = SmoothQuant::name;
  res.smooth = std::move(s);
  return res;
}

}  // namespace detail

template <>
NORMTWEAK_FUNC QuantResult Quantizer<SmoothQuant>::quantize(const TensorView& W, const TensorView& s) const {
  return detail::quantize_impl(SmoothQuant{}, spec_, cfg_, W, s);
}

}  // namespace normtweak
