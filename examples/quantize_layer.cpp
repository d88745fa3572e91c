// Quantize one realistic Linear layer (2048 x 2048, as in a 1B-parameter
// LLaMA's attention projection) with RTN and GPTQ and print the relative
// output error ||X W^T - X Q^T|| / ||X W^T|| on held-out activations.
//
// The activations are synthetic but shaped like a transformer's: correlated
// channels with a decaying spectrum, per-channel offsets and a few outlier
// channels ~20x larger than the rest, which is what makes GPTQ's error
// feedback matter.
#include <normtweak/normtweak.h>

#include <Eigen/Core>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>

using Mat = normtweak::RowMatrix<float>;

struct ActivationModel {
  int n, r;
  Mat mix;
  Eigen::VectorXf offset, scale;
  ActivationModel(int n_, unsigned seed) : n(n_), r(n_ / 4), mix(r, n_), offset(n_), scale(Eigen::VectorXf::Ones(n_)) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> N(0.f, 1.f);
    for (int k = 0; k < r; ++k)
      for (int j = 0; j < n; ++j) mix(k, j) = N(rng) / std::sqrt(1.f + k);
    for (int j = 0; j < n; ++j) offset[j] = 0.3f * N(rng);
    for (int k = 0; k < 8; ++k) scale[std::uniform_int_distribution<int>(0, n - 1)(rng)] = 20.f;
  }
  Mat sample(int tokens, unsigned seed) const {
    std::mt19937 rng(seed);
    std::normal_distribution<float> N(0.f, 1.f);
    Mat Z(tokens, r);
    for (Eigen::Index i = 0; i < Z.size(); ++i) Z.data()[i] = N(rng);
    Mat X = Z * mix;
    for (int t = 0; t < tokens; ++t)
      for (int j = 0; j < n; ++j) X(t, j) = scale[j] * (X(t, j) + offset[j] + 0.1f * N(rng));
    return X;
  }
};

int main() {
  const int n = 2048, m = 2048, calib_tokens = 4096, test_tokens = 1024;
  std::printf("normtweak %s: one %dx%d layer, %d calibration tokens, %d threads\n", NORMTWEAK_VERSION_STRING, m, n,
              calib_tokens, normtweak::num_threads());
  const ActivationModel model(n, 1);
  const Mat X = model.sample(calib_tokens, 2), Xtest = model.sample(test_tokens, 3);
  Mat W(m, n);
  {
    std::mt19937 rng(4);
    std::normal_distribution<float> N(0.f, 1.f);
    for (Eigen::Index i = 0; i < W.size(); ++i) W.data()[i] = 0.02f * N(rng) * std::exp(0.25f * N(rng));
  }
  using clock = std::chrono::steady_clock;
  auto t0 = clock::now();
  normtweak::HessianAccumulator<float> acc(n);
  acc.add_batch(normtweak::TensorView::of(X.data(), {calib_tokens, n}));
  const auto H = acc.view();
  std::printf("Hessian accumulation: %.3f s\n\n", std::chrono::duration<double>(clock::now() - t0).count());

  const Mat ref = Xtest * W.transpose();
  auto out_err = [&](const Mat& Q) { return (ref - Xtest * Q.transpose()).norm() / ref.norm(); };
  const auto Wv = normtweak::TensorView::of(W.data(), {m, n});

  std::printf("%-5s %-7s %10s %10s %10s %9s %9s\n", "bits", "group", "RTN", "GPTQ", "GPTQ+act", "GPTQ/RTN", "GPTQ s");
  for (int bits : {4, 3, 2})
    for (int gs : {-1, 128}) {
      normtweak::QuantSpec spec;
      spec.bits = bits;
      spec.group_size = gs;
      const double e_rtn = out_err(normtweak::Quantizer<normtweak::RTN>(spec).quantize(Wv).Q);
      t0 = clock::now();
      const double e_gptq = out_err(normtweak::Quantizer<normtweak::GPTQ>(spec).quantize(Wv, H).Q);
      const double secs = std::chrono::duration<double>(clock::now() - t0).count();
      normtweak::GPTQ::config act;
      act.act_order = true;
      const double e_act = out_err(normtweak::Quantizer<normtweak::GPTQ>(spec, act).quantize(Wv, H).Q);
      std::printf("%-5d %-7s %10.4f %10.4f %10.4f %9.2f %9.3f\n", bits, gs < 0 ? "channel" : "128", e_rtn, e_gptq,
                  e_act, e_gptq / e_rtn, secs);
    }
  std::printf("\nRelative output error on %d held-out tokens; lower is better.\n", test_tokens);
  return 0;
}
