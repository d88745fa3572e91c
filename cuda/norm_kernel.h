// LayerNorm/RMSNorm backward on the GPU, the same equations as norm_backward()
// in normtweak/norm.h:
//
//   dw[c] = sum_t dy[t,c] * xhat[t,c]          db[c] = sum_t dy[t,c]
//   RMSNorm:   dx = rstd * (g - xhat * mean(g * xhat))
//   LayerNorm: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),   g = dy * w_eff
//
// Two kernels: one block per row for dx (each thread sums a strided share of
// the row, the block reduces the partial sums with warp shuffles, then each
// thread writes its share of dx), and one thread per channel for dw/db (a
// column walk over tokens: neighbouring threads read neighbouring addresses).
// The per-thread arithmetic is in the __host__ __device__ functions below; the
// CPU tests run them over every block and thread of a launch.
#pragma once

#include "normtweak/config.h"

#include <cstdint>

namespace normtweak::cuda {

struct NormBwdParams {
  const float* x;     // [T, C] contiguous
  const float* w;     // [C]
  const float* dy;    // [T, C]
  const float* rstd;  // [T]
  const float* mean;  // [T], LayerNorm only (else nullptr)
  float* dx;          // [T, C]
  float* dw;          // [C]
  float* db;          // [C] or nullptr
  std::int64_t T, C;
  float offset;  // 1 for Gemma's (1 + w), else 0
};

struct RowSums {
  double g = 0.0, gx = 0.0;  // sum of g and of g * xhat over a share of the row
};

NT_HOST_DEVICE inline RowSums operator+(RowSums a, RowSums b) { return {a.g + b.g, a.gx + b.gx}; }

// Thread `tid` of `nthreads`: partial sums over channels c = tid, tid + nthreads, ...
NT_HOST_DEVICE inline RowSums norm_bwd_row_partial(const NormBwdParams& p, std::int64_t t, int tid, int nthreads) {
  const float* xr = p.x + t * p.C;
  const float* gr = p.dy + t * p.C;
  const float r = p.rstd[t], mu = p.mean ? p.mean[t] : 0.f;
  RowSums s;
  for (std::int64_t c = tid; c < p.C; c += nthreads) {
    const float xhat = (xr[c] - mu) * r;
    const float g = gr[c] * (p.w[c] + p.offset);
    s.g += g;
    s.gx += static_cast<double>(g) * xhat;
  }
  return s;
}

// Thread `tid` writes its share of dx[t, :] from the row totals.
NT_HOST_DEVICE inline void norm_bwd_row_dx(const NormBwdParams& p, std::int64_t t, int tid, int nthreads,
                                           RowSums total) {
  const float* xr = p.x + t * p.C;
  const float* gr = p.dy + t * p.C;
  const float r = p.rstd[t], mu = p.mean ? p.mean[t] : 0.f;
  const float mg = p.mean ? static_cast<float>(total.g / static_cast<double>(p.C)) : 0.f;
  const float mgx = static_cast<float>(total.gx / static_cast<double>(p.C));
  for (std::int64_t c = tid; c < p.C; c += nthreads) {
    const float xhat = (xr[c] - mu) * r;
    const float g = gr[c] * (p.w[c] + p.offset);
    p.dx[t * p.C + c] = r * (g - mg - xhat * mgx);
  }
}

// dw[c] and db[c]: sums over all tokens, in double.
NT_HOST_DEVICE inline void norm_bwd_param_column(const NormBwdParams& p, std::int64_t c) {
  double sw = 0.0, sb = 0.0;
  for (std::int64_t t = 0; t < p.T; ++t) {
    const float mu = p.mean ? p.mean[t] : 0.f;
    const float xhat = (p.x[t * p.C + c] - mu) * p.rstd[t];
    const float dy = p.dy[t * p.C + c];
    sw += static_cast<double>(dy) * xhat;
    sb += dy;
  }
  p.dw[c] = static_cast<float>(sw);
  if (p.db) p.db[c] = static_cast<float>(sb);
}

// Forward: y = (x - mu) * rstd * (w + offset) (+ b), saving rstd and (LayerNorm) mu.
struct NormFwdParams {
  const float* x;  // [T, C]
  const float* w;  // [C]
  const float* b;  // [C] or nullptr
  float* y;        // [T, C]
  float* rstd;     // [T]
  float* mean;     // [T], LayerNorm only (else nullptr)
  std::int64_t T, C;
  float eps, offset;
  bool layer;
};

// Thread tid's share of sum_c x[t, c] (LayerNorm's mean).
NT_HOST_DEVICE inline double norm_fwd_row_sum(const NormFwdParams& p, std::int64_t t, int tid, int nthreads) {
  const float* xr = p.x + t * p.C;
  double s = 0.0;
  for (std::int64_t c = tid; c < p.C; c += nthreads) s += xr[c];
  return s;
}

// Thread tid's share of sum_c (x[t, c] - mu)^2 (mu = 0 for RMSNorm).
NT_HOST_DEVICE inline double norm_fwd_row_sq(const NormFwdParams& p, std::int64_t t, int tid, int nthreads, double mu) {
  const float* xr = p.x + t * p.C;
  double s = 0.0;
  for (std::int64_t c = tid; c < p.C; c += nthreads) {
    const double d = xr[c] - mu;
    s += d * d;
  }
  return s;
}

// Thread tid writes its share of y[t, :] from the row's mean and sum of squares;
// thread 0 saves the statistics.
NT_HOST_DEVICE inline void norm_fwd_row_write(const NormFwdParams& p, std::int64_t t, int tid, int nthreads, double mu,
                                              double ss) {
  const float r = static_cast<float>(1.0 / sqrt(ss / static_cast<double>(p.C) + p.eps));
  const float muf = static_cast<float>(mu);
  const float* xr = p.x + t * p.C;
  for (std::int64_t c = tid; c < p.C; c += nthreads) {
    float v = (xr[c] - muf) * r * (p.w[c] + p.offset);
    if (p.b) v += p.b[c];
    p.y[t * p.C + c] = v;
  }
  if (tid == 0) {
    p.rstd[t] = r;
    if (p.mean) p.mean[t] = muf;
  }
}

constexpr int kNormRowThreads = 256;   // threads per row block (8 warps)
constexpr int kNormColThreads = 128;   // threads per block of the column kernel

// Run on `stream` (a cudaStream_t); return the CUDA error code (0 = success).
int launch_norm_forward(const NormFwdParams& p, void* stream);
int launch_norm_backward(const NormBwdParams& p, void* stream);

}  // namespace normtweak::cuda
