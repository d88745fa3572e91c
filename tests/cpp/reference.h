// Reference twins for the tests: plain double-precision implementations
// written straight from the papers' equations (no lazy batching, no BLAS), and
// realistic seeded inputs.
#pragma once

#include "normtweak/normtweak.h"

#include <Eigen/Dense>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

namespace normtweak::test {

using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Activations [tokens, n] that look like a transformer's: correlated channels
// (a random low-rank-plus-noise mixing with a decaying spectrum), a per-channel
// mean offset, and a few outlier channels roughly 20x larger than the rest.
// `seed` fixes the distribution, `sample_seed` the tokens drawn from it, so a
// held-out set is sample(other seed) of the same model.
class ActivationModel {
 public:
  ActivationModel(int n, unsigned seed, int n_outliers = 4) : n_(n), r_(std::max(4, n / 4)), mix_(r_, n), offset_(n), scale_(n, 1.f) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> N01(0.f, 1.f);
    for (int k = 0; k < r_; ++k) {
      const float s = 1.f / std::sqrt(1.f + static_cast<float>(k));  // decaying spectrum
      for (int j = 0; j < n; ++j) mix_(k, j) = s * N01(rng);
    }
    for (int j = 0; j < n; ++j) offset_[j] = 0.3f * N01(rng);
    std::uniform_int_distribution<int> pick(0, n - 1);
    for (int k = 0; k < n_outliers; ++k) scale_[pick(rng)] = 20.f;
  }

  MatF sample(int tokens, unsigned sample_seed) const {
    std::mt19937 rng(sample_seed * 7919u + 1u);
    std::normal_distribution<float> N01(0.f, 1.f);
    MatF Z(tokens, r_);
    for (int t = 0; t < tokens; ++t)
      for (int k = 0; k < r_; ++k) Z(t, k) = N01(rng);
    MatF X = Z * mix_;
    for (int t = 0; t < tokens; ++t)
      for (int j = 0; j < n_; ++j) X(t, j) = scale_[j] * (X(t, j) + offset_[j] + 0.1f * N01(rng));
    return X;
  }

 private:
  int n_, r_;
  MatF mix_;
  std::vector<float> offset_, scale_;
};

inline MatF realistic_activations(int tokens, int n, unsigned seed, int n_outliers = 4) {
  return ActivationModel(n, seed, n_outliers).sample(tokens, 0);
}

// Weights [m, n] with row-dependent scale and heavy-ish tails (a normal
// scaled by a per-entry log-normal factor), as trained Linear layers have.
inline MatF realistic_weights(int m, int n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> N01(0.f, 1.f);
  MatF W(m, n);
  for (int i = 0; i < m; ++i) {
    const float row = 0.02f * std::exp(0.3f * N01(rng));
    for (int j = 0; j < n; ++j) W(i, j) = row * N01(rng) * std::exp(0.25f * N01(rng));
  }
  return W;
}

inline MatD hessian_ref(const MatF& X) {
  const MatD Xd = X.cast<double>();
  return 2.0 / static_cast<double>(X.rows()) * (Xd.transpose() * Xd);
}

// The reference grid (gptq/quant.py find_params and quantize, without the
// clipping search). The grid itself is float32 arithmetic, as in the reference
// (torch float32): in symmetric mode the largest-magnitude value lands exactly
// on a rounding tie (x / scale = +-maxq / 2), so computing the grid in double
// would round those ties differently for a reason that has nothing to do with
// the algorithm under test.
struct RefParams {
  float scale, zero;
};

inline RefParams ref_params(const double* x, int n, int stride, int bits, bool sym) {
  const float maxq = static_cast<float>((1 << bits) - 1);
  float xmin = 0, xmax = 0;
  for (int i = 0; i < n; ++i) {
    xmin = std::min(xmin, static_cast<float>(x[i * stride]));
    xmax = std::max(xmax, static_cast<float>(x[i * stride]));
  }
  if (sym) {
    xmax = std::max(-xmin, xmax);
    if (xmin < 0) xmin = -xmax;
  }
  if (xmin == 0 && xmax == 0) {
    xmin = -1;
    xmax = 1;
  }
  RefParams p;
  p.scale = (xmax - xmin) / maxq;
  p.zero = sym ? (maxq + 1) / 2 : std::nearbyint(-xmin / p.scale);
  return p;
}

inline double ref_code(double x, RefParams p, int bits) {
  const float maxq = static_cast<float>((1 << bits) - 1);
  return std::clamp(std::nearbyint(static_cast<float>(x) / p.scale) + p.zero, 0.f, maxq);
}

struct RefResult {
  MatD Q;
  Eigen::Matrix<int, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> codes;
  std::vector<int> g_idx;
  double loss = 0;
};

inline RefResult rtn_ref(const MatF& Wf, int bits, int group_size, bool sym) {
  const MatD W = Wf.cast<double>();
  const int m = static_cast<int>(W.rows()), n = static_cast<int>(W.cols());
  const int gs = group_size > 0 ? group_size : n;
  RefResult r;
  r.Q.resize(m, n);
  r.codes.resize(m, n);
  r.g_idx.resize(n);
  const int G = (n + gs - 1) / gs;
  for (int i = 0; i < m; ++i)
    for (int g = 0; g < G; ++g) {
      const int width = std::min(gs, n - g * gs);  // the last group may be short
      const RefParams p = ref_params(&W(i, g * gs), width, 1, bits, sym);
      for (int c = g * gs; c < g * gs + width; ++c) {
        const double code = ref_code(W(i, c), p, bits);
        r.codes(i, c) = static_cast<int>(code);
        r.Q(i, c) = static_cast<double>(p.scale) * (code - p.zero);
        r.loss += (W(i, c) - r.Q(i, c)) * (W(i, c) - r.Q(i, c));
        r.g_idx[c] = group_size > 0 ? g : 0;
      }
    }
  return r;
}

// GPTQ from the paper's equations, one column at a time in double precision:
//   q_i = quant(w_i);  e = (w_i - q_i) / [H^-1]_ii;  w_{i+1:} -= e * [H^-1]_{i, i+1:}
// with [H^-1] the upper Cholesky factor of the damped inverse Hessian (Alg. 1).
inline RefResult gptq_ref(const MatF& Wf, MatD H, int bits, int group_size, bool sym, bool act_order,
                          bool static_groups, double percdamp = 0.01) {
  MatD W = Wf.cast<double>();
  const int m = static_cast<int>(W.rows()), n = static_cast<int>(W.cols());
  const int gs = group_size;
  std::vector<RefParams> row_params(m);
  if (gs <= 0)
    for (int i = 0; i < m; ++i) row_params[i] = ref_params(&W(i, 0), n, 1, bits, sym);
  for (int j = 0; j < n; ++j)
    if (H(j, j) == 0) {
      H(j, j) = 1;
      W.col(j).setZero();
    }
  std::vector<std::vector<RefParams>> static_params;
  if (gs > 0 && static_groups) {
    const int G = (n + gs - 1) / gs;
    static_params.assign(m, std::vector<RefParams>(G));
    for (int i = 0; i < m; ++i)
      for (int g = 0; g < G; ++g) static_params[i][g] = ref_params(&W(i, g * gs), std::min(gs, n - g * gs), 1, bits, sym);
  }
  std::vector<int> perm(n);
  std::iota(perm.begin(), perm.end(), 0);
  if (act_order) std::stable_sort(perm.begin(), perm.end(), [&](int a, int b) { return H(a, a) > H(b, b); });
  MatD Wp(m, n), Hp(n, n);
  for (int j = 0; j < n; ++j) {
    Wp.col(j) = W.col(perm[j]);
    for (int k = 0; k < n; ++k) Hp(j, k) = H(perm[j], perm[k]);
  }
  const double damp = percdamp * Hp.diagonal().mean();
  Hp.diagonal().array() += damp;
  const MatD Hi = Hp.llt().solve(MatD::Identity(n, n));
  const MatD U = Hi.llt().matrixU();

  RefResult r;
  r.Q.resize(m, n);
  r.codes.resize(m, n);
  r.g_idx.resize(n);
  std::vector<RefParams> cur(m);
  for (int j = 0; j < n; ++j) {
    const int g = gs > 0 ? (static_groups ? perm[j] / gs : j / gs) : 0;
    r.g_idx[perm[j]] = g;
    for (int i = 0; i < m; ++i) {
      RefParams p;
      if (gs <= 0) {
        p = row_params[i];
      } else if (static_groups) {
        p = static_params[i][g];
      } else {
        if (j % gs == 0) cur[i] = ref_params(&Wp(i, j), std::min(gs, n - j), 1, bits, sym);
        p = cur[i];
      }
      const double w = Wp(i, j);
      const double code = ref_code(w, p, bits);
      const double q = static_cast<double>(p.scale) * (code - p.zero);
      r.codes(i, perm[j]) = static_cast<int>(code);
      r.Q(i, perm[j]) = q;
      const double e = (w - q) / U(j, j);
      r.loss += e * e / 2;
      for (int k = j + 1; k < n; ++k) Wp(i, k) -= e * U(j, k);
    }
  }
  return r;
}

// ||X W^T - X Q^T||_F / ||X W^T||_F
template <typename QM>
inline double output_error(const MatF& X, const MatF& W, const QM& Q) {
  const MatD Xd = X.cast<double>();
  const MatD ref = Xd * W.cast<double>().transpose();
  const MatD out = Xd * Q.template cast<double>().transpose();
  return (ref - out).norm() / ref.norm();
}

template <typename A, typename B>
inline double rel_diff(const A& a, const B& b) {
  return (a.template cast<double>() - b.template cast<double>()).norm() / b.template cast<double>().norm();
}

}  // namespace normtweak::test
