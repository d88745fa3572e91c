#include "reference.h"
#include "tolerances.h"

#include <normtweak/smoothquant.h>

#include <catch2/catch.hpp>

#include <cmath>

using namespace normtweak;
using namespace normtweak::test;

namespace {

// Paper eq. 4 in double precision, straight from the definition.
std::vector<double> smooth_ref(const MatF& X, const std::vector<const MatF*>& Ws, double alpha) {
  const int n = static_cast<int>(X.cols());
  std::vector<double> s(n);
  for (int j = 0; j < n; ++j) {
    double a = 0, w = 0;
    for (int t = 0; t < X.rows(); ++t) a = std::max(a, std::fabs(static_cast<double>(X(t, j))));
    for (const MatF* W : Ws)
      for (int r = 0; r < W->rows(); ++r) w = std::max(w, std::fabs(static_cast<double>((*W)(r, j))));
    s[j] = std::pow(std::max(a, 1e-5), alpha) / std::pow(std::max(w, 1e-5), 1 - alpha);
  }
  return s;
}

}  // namespace

TEST_CASE("ActAbsMax and smooth_factors match the double-precision twin", "[smoothquant]") {
  const int n = 192;
  const MatF X = realistic_activations(1000, n, 3);
  const MatF Wq = realistic_weights(64, n, 4), Wk = realistic_weights(32, n, 5);
  ActAbsMax acts(n);
  // Batches of uneven size, one of them strided (every other row), must give the same maxima.
  acts.add_batch(TensorView::of(X.data(), {300, n}));
  acts.add_batch(TensorView(const_cast<float*>(X.data()) + 300 * n, dtype::f32, {350, n}, {2 * n, 1}));
  for (int t = 301; t < 1000; t += 2) acts.add_batch(TensorView::of(X.data() + t * n, {1, n}));
  MatF seen(650 + 350, n);
  seen.topRows(300) = X.topRows(300);
  for (int i = 0; i < 350; ++i) seen.row(300 + i) = X.row(300 + 2 * i);
  for (int i = 0; i < 350; ++i) seen.row(650 + i) = X.row(301 + 2 * i);
  CHECK(acts.tokens() == 1000);
  for (double alpha : {0.0, 0.5, 0.8, 1.0}) {
    CAPTURE(alpha);
    const auto s = smooth_factors(acts.view(), {TensorView::of(Wq.data(), {64, n}), TensorView::of(Wk.data(), {32, n})},
                                  static_cast<float>(alpha));
    const auto ref = smooth_ref(seen, {&Wq, &Wk}, alpha);
    double num = 0, den = 0;
    for (int j = 0; j < n; ++j) {
      num += (s[j] - ref[j]) * (s[j] - ref[j]);
      den += ref[j] * ref[j];
    }
    CHECK(std::sqrt(num / den) < tol::smooth_factors);
  }
}

TEST_CASE("SmoothQuant flattens outlier channels and keeps X W^T exact before rounding", "[smoothquant]") {
  const int n = 256, m = 96, t = 512;
  const MatF X = realistic_activations(t, n, 7);  // a few ~20x outlier channels
  const MatF W = realistic_weights(m, n, 8);
  ActAbsMax acts(n);
  acts.add_batch(TensorView::of(X.data(), {t, n}));
  const auto s = smooth_factors(acts.view(), {TensorView::of(W.data(), {m, n})}, 0.5f);
  // Spread of the per-channel maxima shrinks after dividing X by s.
  auto spread = [&](const Eigen::VectorXd& v) { return v.maxCoeff() / v.minCoeff(); };
  Eigen::VectorXd a(n), as(n);
  for (int j = 0; j < n; ++j) {
    a[j] = acts.absmax()[j];
    as[j] = a[j] / s[j];
  }
  CHECK(spread(as) < 0.25 * spread(a));
  QuantSpec spec;
  spec.bits = 8;
  spec.group_size = -1;
  const QuantResult r = Quantizer<SmoothQuant>(spec).quantize(TensorView::of(W.data(), {m, n}),
                                                              TensorView::of(s.data(), {n}));
  CHECK(r.method == "smoothquant");
  REQUIRE(r.smooth.size() == static_cast<std::size_t>(n));
  // (X / s) Q^T approximates X W^T: Q is W diag(s) on an 8-bit grid.
  MatF Xs = X, Y = X * W.transpose();
  for (int j = 0; j < n; ++j) Xs.col(j) /= r.smooth[j];
  const MatF Yq = Xs * r.Q.transpose();
  CHECK((Yq - Y).norm() / Y.norm() < tol::smoothquant_w8_output);
  // And the codes are RTN's on W diag(s).
  MatF Ws = W;
  for (int j = 0; j < n; ++j) Ws.col(j) *= s[j];
  const QuantResult rr = Quantizer<RTN>(spec).quantize(TensorView::of(Ws.data(), {m, n}));
  CHECK(rr.codes == r.codes);
}

TEST_CASE("SmoothQuant errors name the value", "[smoothquant]") {
  const int n = 8;
  MatF W = realistic_weights(4, n, 1);
  std::vector<float> a(n, 1.0f);
  auto msg = [&](auto&& f) {
    try {
      f();
    } catch (const error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  CHECK_THAT(msg([&] { smooth_factors(TensorView::of(a.data(), {n}), {TensorView::of(W.data(), {4, n})}, 1.5f); }),
             Catch::Contains("alpha=1.5"));
  CHECK_THAT(msg([&] { smooth_factors(TensorView::of(a.data(), {n}), {TensorView::of(W.data(), {2, 2 * n})}, 0.5f); }),
             Catch::Contains("[2, 16]"));
  std::vector<float> s(n, 1.0f);
  s[3] = 0.0f;
  QuantSpec spec;
  CHECK_THAT(msg([&] { Quantizer<SmoothQuant>(spec).quantize(TensorView::of(W.data(), {4, n}), TensorView::of(s.data(), {n})); }),
             Catch::Contains("s[3]=0"));
  ActAbsMax acts(n);
  MatF bad = realistic_activations(4, n, 2);
  bad(2, 5) = NAN;
  CHECK_THAT(msg([&] { acts.add_batch(TensorView::of(bad.data(), {4, n})); }), Catch::Contains("1 NaN/Inf"));
  CHECK_THAT(msg([&] { acts.add_batch(TensorView::of(bad.data(), {2, 2 * n})); }), Catch::Contains("in_features=8"));
}
