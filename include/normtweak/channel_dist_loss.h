// ChannelDistLoss: the Norm Tweaking objective (paper eq. 2) between a block's
// float output f and its quantized output q, both [tokens, C]:
//
//   L = 1/C * sum_c ( |mu_f^c - mu_q^c| + |var_f^c - var_q^c| )
//
// with mu and var the per-channel mean and (population) variance over tokens,
// and the hand-written gradient
//
//   dL/dq[t,c] = 1/C * ( sign(mu_q - mu_f) / T + sign(var_q - var_f) * 2 (q[t,c] - mu_q) / T ).
//
// reldist measures each channel in its own units: with v_c = var_f^c + 1e-6,
//
//   L = 1/C * sum_c ( |mu_f^c - mu_q^c| / sqrt(v_c) + |var_f^c - var_q^c| / v_c ),
//
// so a few channels of very large variance (SmolLM2's residual stream has
// channels of variance ~5000 beside a median of ~3) do not outweigh the rest;
// the gradient is eq. 2's with a and b divided by sqrt(v_c) and v_c.
//
// The MSE and KL variants are the paper's Table 9 ablation: MSE is the mean of
// (q - f)^2 over all entries; KL is 1/T sum_t KL(softmax(f_t) || softmax(q_t))
// over channels (Hinton-style distillation at temperature 1).
//
// Inputs: f, q float32 (or float16/bfloat16/float64), CPU, same shape,
// contiguous in the last dimension; leading dimensions are flattened.
// grad_q (optional): float32 [tokens, C] contiguous, written, not accumulated.
#pragma once

#include "normtweak/cuda_dispatch.h"
#include "normtweak/detail/convert.h"
#include "normtweak/quantizer.h"
#include "normtweak/tensor_view.h"
#include "normtweak/threading.h"

#include <fmt/ranges.h>

#include <cmath>
#include <iterator>
#include <string>
#include <vector>

namespace normtweak {

enum class DistLoss { dist, mse, kl, reldist };

// The losses' names, in the order the enum lists them; the bindings and the CLI read them from here.
inline constexpr const char* kDistLossNames[] = {"dist", "mse", "kl", "reldist"};
static_assert(std::size(kDistLossNames) == static_cast<size_t>(DistLoss::reldist) + 1,
              "kDistLossNames must name every DistLoss, in the enum's order");

inline DistLoss dist_loss_from_string(const std::string& s) {
  for (size_t i = 0; i < std::size(kDistLossNames); ++i)
    if (s == kDistLossNames[i]) return static_cast<DistLoss>(i);
  NT_THROW(errc::invalid_argument, "loss='{}' is not one of {}", s, fmt::join(kDistLossNames, ", "));
}

namespace detail {

struct LossInputs {
  RowMatrix<float> f, q;  // [T, C] float32 copies
};

inline LossInputs load_loss_inputs(const TensorView& f, const TensorView& q) {
  for (const auto* t : {&f, &q}) {
    require_cpu(*t, t == &f ? "f (float output)" : "q (quantized output)");
    require_floating(*t, t == &f ? "f (float output)" : "q (quantized output)");
  }
  NT_CHECK(f.rank() == q.rank() && f.numel() == q.numel() && f.rank() >= 1 && f.size(-1) == q.size(-1),
           "float output has shape {} but quantized output has shape {}; they must match", f.shape_str(), q.shape_str());
  const TensorView f2 = f.flatten_2d("f"), q2 = q.flatten_2d("q");
  NT_CHECK(f2.size(0) > 0, "ChannelDistLoss needs at least one token, got shape {}", f.shape_str());
  LossInputs in{RowMatrix<float>(f2.size(0), f2.size(1)), RowMatrix<float>(q2.size(0), q2.size(1))};
  const std::int64_t bf = copy_rows<float>(f2, 0, f2.size(0), in.f.data());
  const std::int64_t bq = copy_rows<float>(q2, 0, q2.size(0), in.q.data());
  NT_CHECK(bf == 0 && bq == 0, "ChannelDistLoss inputs contain NaN/Inf ({} in the float output, {} in the quantized "
           "output); lower the tweak learning rate (--tweak-lr)", bf, bq);
  return in;
}

template <typename T>
inline T sign_of(T x) {
  return static_cast<T>((x > T(0)) - (x < T(0)));
}

}  // namespace detail

// Returns the loss; writes dL/dq into grad_q when it is given.
inline double channel_dist_loss(const TensorView& f, const TensorView& q, DistLoss kind,
                                const TensorView* grad_q = nullptr) {
  if (on_cuda(f) || on_cuda(q)) {
    require_same_device(f, "f (float output)", q, "q (quantized output)");
    return cuda_backend_for(f, "f (float output)").channel_dist_loss(f, q, kind, grad_q, cuda_stream_slot());
  }
  const detail::LossInputs in = detail::load_loss_inputs(f, q);
  const std::int64_t T = in.f.rows(), C = in.f.cols();
  float* g = nullptr;
  if (grad_q) {
    require_cpu(*grad_q, "grad_q");
    require_dtype(*grad_q, dtype::f32, "grad_q");
    require_contiguous(*grad_q, "grad_q");
    NT_CHECK(grad_q->numel() == T * C, "grad_q has {} elements, expected {} x {}", grad_q->numel(), T, C);
    g = grad_q->data_as<float>();
  }
  const int nt = num_threads();
  double loss = 0.0;
  if (kind == DistLoss::dist || kind == DistLoss::reldist) {
    // Per-channel statistics in double: sums over up to 10^5..10^6 tokens.
    std::vector<double> mu_f(C, 0.0), mu_q(C, 0.0), var_f(C, 0.0), var_q(C, 0.0);
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t c = 0; c < C; ++c) {
        mu_f[c] += in.f(t, c);
        mu_q[c] += in.q(t, c);
      }
    for (std::int64_t c = 0; c < C; ++c) {
      mu_f[c] /= T;
      mu_q[c] /= T;
    }
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t c = 0; c < C; ++c) {
        const double df = in.f(t, c) - mu_f[c], dq = in.q(t, c) - mu_q[c];
        var_f[c] += df * df;
        var_q[c] += dq * dq;
      }
    std::vector<float> a(C), b(C);  // gradient coefficients per channel
    for (std::int64_t c = 0; c < C; ++c) {
      var_f[c] /= T;
      var_q[c] /= T;
      // reldist: each channel in units of its float standard deviation (mean) and variance.
      const double v = var_f[c] + kRelDistVarFloor;
      const double sm = kind == DistLoss::reldist ? 1.0 / std::sqrt(v) : 1.0;
      const double sv = kind == DistLoss::reldist ? 1.0 / v : 1.0;
      loss += sm * std::abs(mu_f[c] - mu_q[c]) + sv * std::abs(var_f[c] - var_q[c]);
      a[c] = static_cast<float>(sm * detail::sign_of(mu_q[c] - mu_f[c]) / (double(C) * T));
      b[c] = static_cast<float>(sv * detail::sign_of(var_q[c] - var_f[c]) * 2.0 / (double(C) * T));
    }
    loss /= static_cast<double>(C);
    if (g) {
#pragma omp parallel for num_threads(nt) schedule(static)
      for (std::int64_t t = 0; t < T; ++t)
        for (std::int64_t c = 0; c < C; ++c)
          g[t * C + c] = a[c] + b[c] * static_cast<float>(in.q(t, c) - mu_q[c]);
    }
  } else if (kind == DistLoss::mse) {
    const double inv = 1.0 / (static_cast<double>(T) * C);
    for (std::int64_t i = 0; i < T * C; ++i) {
      const double d = static_cast<double>(in.q.data()[i]) - in.f.data()[i];
      loss += d * d;
      if (g) g[i] = static_cast<float>(2.0 * d * inv);
    }
    loss *= inv;
  } else {
    std::vector<double> row_loss(T, 0.0);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (std::int64_t t = 0; t < T; ++t) {
      const float* fr = in.f.data() + t * C;
      const float* qr = in.q.data() + t * C;
      double mf = fr[0], mq = qr[0];
      for (std::int64_t c = 1; c < C; ++c) {
        mf = std::max<double>(mf, fr[c]);
        mq = std::max<double>(mq, qr[c]);
      }
      double sf = 0, sq = 0;
      for (std::int64_t c = 0; c < C; ++c) {
        sf += std::exp(fr[c] - mf);
        sq += std::exp(qr[c] - mq);
      }
      const double lsf = mf + std::log(sf), lsq = mq + std::log(sq);
      double kl = 0;
      for (std::int64_t c = 0; c < C; ++c) {
        const double lpf = fr[c] - lsf, lpq = qr[c] - lsq;
        const double pf = std::exp(lpf);
        kl += pf * (lpf - lpq);
        if (g) g[t * C + c] = static_cast<float>((std::exp(lpq) - pf) / static_cast<double>(T));
      }
      row_loss[t] = kl;
    }
    for (double v : row_loss) loss += v;
    loss /= static_cast<double>(T);
  }
  return loss;
}

}  // namespace normtweak
