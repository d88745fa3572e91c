// LayerNorm and RMSNorm forward and hand-written backward over rows of
// x [tokens, C] (float32, contiguous), the only parameters Norm Tweaking trains.
//
//   RMSNorm:   y = x * rstd * w_eff,            rstd = 1 / sqrt(mean(x^2) + eps)
//   LayerNorm: y = (x - mu) * rstd * w_eff + b, rstd = 1 / sqrt(var(x) + eps)
//   w_eff = w, or 1 + w for Gemma's RMSNorm (unit_offset).
//
// Backward, with xhat the normalized input and g = dy * w_eff:
//   dw[c] = sum_t dy[t,c] * xhat[t,c]          db[c] = sum_t dy[t,c]
//   RMSNorm:   dx = rstd * (g - xhat * mean(g * xhat))
//   LayerNorm: dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
// Per-row reductions are accumulated in double.
#pragma once

#include "normtweak/cuda_dispatch.h"
#include "normtweak/tensor_view.h"
#include "normtweak/threading.h"

#include <cmath>
#include <cstdint>
#include <vector>

namespace normtweak {

struct NormSpec {
  enum class Kind { rms, layer } kind = Kind::rms;
  float eps = 1e-6f;
  bool unit_offset = false;  // Gemma: scale by (1 + w)
};

namespace detail {

struct NormArgs {
  std::int64_t T, C;
  const float* x;
  const float* w;
  const float* b;
};

inline NormArgs check_norm_args(const NormSpec& spec, const TensorView& x, const TensorView& w, const TensorView* b) {
  require_cpu(x, "x");
  require_dtype(x, dtype::f32, "x");
  require_contiguous(x, "x");
  require_cpu(w, "weight");
  require_dtype(w, dtype::f32, "weight");
  require_contiguous(w, "weight");
  NT_CHECK(x.rank() >= 1, "x must have at least one dimension");
  const std::int64_t C = x.size(-1);
  NT_CHECK(w.numel() == C, "norm weight has {} elements but x has {} channels (shape {})", w.numel(), C,
           x.shape_str());
  NT_CHECK(spec.eps >= 0.f, "norm eps={} must be non-negative", spec.eps);
  const float* bp = nullptr;
  if (b && b->data()) {
    NT_CHECK(spec.kind == NormSpec::Kind::layer, "RMSNorm has no bias, but a bias tensor was given");
    require_dtype(*b, dtype::f32, "bias");
    require_contiguous(*b, "bias");
    NT_CHECK(b->numel() == C, "norm bias has {} elements but x has {} channels", b->numel(), C);
    bp = b->data_as<const float>();
  }
  return {C ? x.numel() / C : 0, C, x.data_as<const float>(), w.data_as<const float>(), bp};
}

inline void check_out(const TensorView& t, std::int64_t n, const char* name) {
  require_cpu(t, name);
  require_dtype(t, dtype::f32, name);
  require_contiguous(t, name);
  NT_CHECK(t.numel() == n, "{} has {} elements, expected {}", name, t.numel(), n);
}

}  // namespace detail

// y [T, C] and the saved per-row statistics rstd [T] and (LayerNorm) mean [T].
inline void norm_forward(const NormSpec& spec, const TensorView& x, const TensorView& w, const TensorView* b,
                         const TensorView& y, const TensorView& rstd, const TensorView* mean) {
  if (on_cuda(x)) {
    cuda_backend_for(x, "x").norm_forward(spec, x, w, b, y, rstd, mean, cuda_stream_slot());
    return;
  }
  const detail::NormArgs a = detail::check_norm_args(spec, x, w, b);
  detail::check_out(y, a.T * a.C, "y");
  detail::check_out(rstd, a.T, "rstd");
  const bool layer = spec.kind == NormSpec::Kind::layer;
  if (layer) {
    NT_CHECK(mean != nullptr, "LayerNorm forward needs an output for the per-row mean");
    detail::check_out(*mean, a.T, "mean");
  }
  float* yp = y.data_as<float>();
  float* rp = rstd.data_as<float>();
  float* mp = layer ? mean->data_as<float>() : nullptr;
  const float off = spec.unit_offset ? 1.f : 0.f;
#pragma omp parallel for num_threads(num_threads()) schedule(static)
  for (std::int64_t t = 0; t < a.T; ++t) {
    const float* xr = a.x + t * a.C;
    double mu = 0.0;
    if (layer) {
      for (std::int64_t c = 0; c < a.C; ++c) mu += xr[c];
      mu /= static_cast<double>(a.C);
    }
    double ss = 0.0;
    for (std::int64_t c = 0; c < a.C; ++c) {
      const double d = xr[c] - mu;
      ss += d * d;
    }
    const float r = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(a.C) + spec.eps));
    rp[t] = r;
    if (layer) mp[t] = static_cast<float>(mu);
    const float muf = static_cast<float>(mu);
    for (std::int64_t c = 0; c < a.C; ++c) {
      float v = (xr[c] - muf) * r * (a.w[c] + off);
      if (a.b) v += a.b[c];
      yp[t * a.C + c] = v;
    }
  }
}

// dx [T, C], dw [C], db [C] (LayerNorm with bias) from dy [T, C] and the saved statistics.
inline void norm_backward(const NormSpec& spec, const TensorView& x, const TensorView& w, const TensorView& dy,
                          const TensorView& rstd, const TensorView* mean, const TensorView& dx, const TensorView& dw,
                          const TensorView* db) {
  if (on_cuda(x)) {
    cuda_backend_for(x, "x").norm_backward(spec, x, w, dy, rstd, mean, dx, dw, db, cuda_stream_slot());
    return;
  }
  const detail::NormArgs a = detail::check_norm_args(spec, x, w, nullptr);
  detail::check_out(dy, a.T * a.C, "dy");
  detail::check_out(rstd, a.T, "rstd");
  detail::check_out(dx, a.T * a.C, "dx");
  detail::check_out(dw, a.C, "dw");
  const bool layer = spec.kind == NormSpec::Kind::layer;
  if (layer) detail::check_out(*mean, a.T, "mean");
  if (db && db->data()) detail::check_out(*db, a.C, "db");
  const float* g_in = dy.data_as<const float>();
  const float* rp = rstd.data_as<const float>();
  const float* mp = layer ? mean->data_as<const float>() : nullptr;
  float* dxp = dx.data_as<float>();
  const float off = spec.unit_offset ? 1.f : 0.f;
  const int nt = num_threads();
  // Parameter gradients: per-thread partial sums over fixed token ranges, then
  // a reduction in thread order, so results depend only on the thread count.
  std::vector<double> dw_part(static_cast<std::size_t>(nt * a.C), 0.0), db_part(dw_part.size(), 0.0);
#pragma omp parallel num_threads(nt)
  {
#if defined(_OPENMP)
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
#else
    const int tid = 0, nth = 1;
#endif
    const std::int64_t t0 = a.T * tid / nth, t1 = a.T * (tid + 1) / nth;
    double* dwp = dw_part.data() + tid * a.C;
    double* dbp = db_part.data() + tid * a.C;
    for (std::int64_t t = t0; t < t1; ++t) {
      const float* xr = a.x + t * a.C;
      const float* gr = g_in + t * a.C;
      const float r = rp[t], mu = layer ? mp[t] : 0.f;
      double sum_g = 0.0, sum_gx = 0.0;
      for (std::int64_t c = 0; c < a.C; ++c) {
        const float xhat = (xr[c] - mu) * r;
        const float g = gr[c] * (a.w[c] + off);
        sum_g += g;
        sum_gx += static_cast<double>(g) * xhat;
        dwp[c] += static_cast<double>(gr[c]) * xhat;
        dbp[c] += gr[c];
      }
      const float mg = layer ? static_cast<float>(sum_g / a.C) : 0.f;
      const float mgx = static_cast<float>(sum_gx / a.C);
      for (std::int64_t c = 0; c < a.C; ++c) {
        const float xhat = (xr[c] - mu) * r;
        const float g = gr[c] * (a.w[c] + off);
        dxp[t * a.C + c] = r * (g - mg - xhat * mgx);
      }
    }
  }
  float* dwo = dw.data_as<float>();
  float* dbo = (db && db->data()) ? db->data_as<float>() : nullptr;
  for (std::int64_t c = 0; c < a.C; ++c) {
    double sw = 0.0, sb = 0.0;
    for (int p = 0; p < nt; ++p) {
      sw += dw_part[p * a.C + c];
      sb += db_part[p * a.C + c];
    }
    dwo[c] = static_cast<float>(sw);
    if (dbo) dbo[c] = static_cast<float>(sb);
  }
}

}  // namespace normtweak
