// The Norm Tweaking loss (paper eq. 2) and its gradient on the GPU, the same
// equations as channel_dist_loss() in normtweak/channel_dist_loss.h:
//
//   L = 1/C * sum_c ( |mu_f^c - mu_q^c| + |var_f^c - var_q^c| )
//   dL/dq[t,c] = a[c] + b[c] * (q[t,c] - mu_q[c]),
//   a[c] = sign(mu_q - mu_f) / (C T),  b[c] = 2 sign(var_q - var_f) / (C T)
//
// Kernel 1, one thread per channel: two passes down the column (mean, then
// centred variance, both in double), the channel's loss term and a, b.
// Kernel 2, a grid-stride loop over elements: the gradient. The caller sums
// the C loss terms (a device reduction or C doubles copied back).
// reldist (relative = true) divides channel c's two terms, and a and b, by
// sqrt(v_c) and v_c, v_c = var_f^c + kRelDistVarFloor.
// MSE and KL (the paper's Table 9 ablation) have element- and row-wise bodies.
#pragma once

#include "normtweak/config.h"

#include <cmath>
#include <cstdint>

namespace normtweak::cuda {

struct DistLossParams {
  const float* f;    // [T, C] float output, contiguous
  const float* q;    // [T, C] quantized output
  float* grad;       // [T, C] dL/dq, or nullptr
  double* term;      // [C] |dmu| + |dvar| per channel (the loss is their sum / C)
  float* a;          // [C] gradient coefficients
  float* b;          // [C]
  float* mu_q;       // [C]
  std::int64_t T, C;
  bool relative = false;  // reldist: channel c's terms divided by sqrt(v_c) and v_c, v_c = var_f^c + floor
};

NT_HOST_DEVICE inline double sign_d(double x) { return static_cast<double>((x > 0.0) - (x < 0.0)); }

NT_HOST_DEVICE inline void dist_loss_channel(const DistLossParams& p, std::int64_t c) {
  double mf = 0.0, mq = 0.0;
  for (std::int64_t t = 0; t < p.T; ++t) {
    mf += p.f[t * p.C + c];
    mq += p.q[t * p.C + c];
  }
  mf /= static_cast<double>(p.T);
  mq /= static_cast<double>(p.T);
  double vf = 0.0, vq = 0.0;
  for (std::int64_t t = 0; t < p.T; ++t) {
    const double df = p.f[t * p.C + c] - mf, dq = p.q[t * p.C + c] - mq;
    vf += df * df;
    vq += dq * dq;
  }
  vf /= static_cast<double>(p.T);
  vq /= static_cast<double>(p.T);
  const double v = vf + kRelDistVarFloor;
  const double sm = p.relative ? 1.0 / sqrt(v) : 1.0, sv = p.relative ? 1.0 / v : 1.0;
  p.term[c] = sm * fabs(mf - mq) + sv * fabs(vf - vq);
  const double ct = static_cast<double>(p.C) * static_cast<double>(p.T);
  p.a[c] = static_cast<float>(sm * sign_d(mq - mf) / ct);
  p.b[c] = static_cast<float>(sv * sign_d(vq - vf) * 2.0 / ct);
  p.mu_q[c] = static_cast<float>(mq);
}

NT_HOST_DEVICE inline void dist_loss_grad(const DistLossParams& p, std::int64_t i) {
  const std::int64_t c = i % p.C;
  p.grad[i] = p.a[c] + p.b[c] * (p.q[i] - p.mu_q[c]);
}

// MSE: mean (q - f)^2; term[i] = (q - f)^2 / (T C), grad = 2 (q - f) / (T C).
struct MseLossParams {
  const float* f;
  const float* q;
  float* grad;   // or nullptr
  double* term;  // [T * C]
  std::int64_t n;
};

NT_HOST_DEVICE inline void mse_loss_element(const MseLossParams& p, std::int64_t i) {
  const double d = static_cast<double>(p.q[i]) - p.f[i];
  p.term[i] = d * d / static_cast<double>(p.n);
  if (p.grad) p.grad[i] = static_cast<float>(2.0 * d / static_cast<double>(p.n));
}

// KL: 1/T sum_t KL(softmax(f_t) || softmax(q_t)); one row per thread.
struct KlLossParams {
  const float* f;
  const float* q;
  float* grad;   // or nullptr
  double* term;  // [T]: the row's KL / T
  std::int64_t T, C;
};

NT_HOST_DEVICE inline void kl_loss_row(const KlLossParams& p, std::int64_t t) {
  const float* fr = p.f + t * p.C;
  const float* qr = p.q + t * p.C;
  double mf = fr[0], mq = qr[0];
  for (std::int64_t c = 1; c < p.C; ++c) {
    mf = fr[c] > mf ? fr[c] : mf;
    mq = qr[c] > mq ? qr[c] : mq;
  }
  double sf = 0.0, sq = 0.0;
  for (std::int64_t c = 0; c < p.C; ++c) {
    sf += exp(fr[c] - mf);
    sq += exp(qr[c] - mq);
  }
  const double lsf = mf + log(sf), lsq = mq + log(sq);
  double kl = 0.0;
  for (std::int64_t c = 0; c < p.C; ++c) {
    const double lpf = fr[c] - lsf, lpq = qr[c] - lsq, pf = exp(lpf);
    kl += pf * (lpf - lpq);
    if (p.grad) p.grad[t * p.C + c] = static_cast<float>((exp(lpq) - pf) / static_cast<double>(p.T));
  }
  p.term[t] = kl / static_cast<double>(p.T);
}

constexpr int kLossThreads = 256;

// Each launcher runs its kernels on `stream` (a cudaStream_t) and leaves the
// per-channel / per-element / per-row terms in device memory; returns the CUDA
// error code (0 = success).
int launch_dist_loss(const DistLossParams& p, void* stream);
int launch_mse_loss(const MseLossParams& p, void* stream);
int launch_kl_loss(const KlLossParams& p, void* stream);

}  // namespace normtweak::cuda
