// Quantizes a small layer with GPTQ and RTN through the public API and checks
// that GPTQ's output error is the smaller one.
#include <normtweak/normtweak.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

int main() {
  const int m = 64, n = 128, T = 1024;
  std::mt19937 rng(0);
  std::normal_distribution<float> N(0.f, 1.f);
  std::vector<float> X(T * n), W(m * n);
  for (int t = 0; t < T; ++t) {
    const float shared = N(rng);  // one common factor correlates all channels
    for (int j = 0; j < n; ++j) X[t * n + j] = (j % 17 == 0 ? 10.f : 1.f) * (shared + 0.5f * N(rng));
  }
  for (auto& w : W) w = 0.02f * N(rng);

  normtweak::HessianAccumulator<float> acc(n);
  acc.add_batch(normtweak::TensorView::of(X.data(), {T, n}));
  normtweak::QuantSpec spec;
  spec.bits = 3;
  spec.group_size = 64;
  const auto Wv = normtweak::TensorView::of(W.data(), {m, n});
  const auto gptq = normtweak::Quantizer<normtweak::GPTQ>(spec).quantize(Wv, acc.view());
  const auto rtn = normtweak::Quantizer<normtweak::RTN>(spec).quantize(Wv);

  auto out_err = [&](const normtweak::RowMatrix<float>& Q) {
    double num = 0, den = 0;
    for (int t = 0; t < T; ++t)
      for (int i = 0; i < m; ++i) {
        double y = 0, yq = 0;
        for (int j = 0; j < n; ++j) {
          y += X[t * n + j] * W[i * n + j];
          yq += X[t * n + j] * Q(i, j);
        }
        num += (y - yq) * (y - yq);
        den += y * y;
      }
    return std::sqrt(num / den);
  };
  const double eg = out_err(gptq.Q), er = out_err(rtn.Q);
  const auto packed = normtweak::pack_gptq(gptq, spec.bits);
  std::printf("normtweak %s consumer: output error GPTQ %.4f vs RTN %.4f; qweight %ldx%ld\n", NORMTWEAK_VERSION_STRING,
              eg, er, static_cast<long>(packed.qweight.rows()), static_cast<long>(packed.qweight.cols()));
  return eg < er ? 0 : 1;
}
