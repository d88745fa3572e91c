#include "reference.h"
#include "tolerances.h"

#include <catch2/catch.hpp>

using namespace normtweak;
using namespace normtweak::test;

TEST_CASE("RTN matches the scalar reference twin", "[rtn]") {
  const int m = 64, n = 256;
  const MatF W = realistic_weights(m, n, 1);
  for (int bits : {2, 3, 4, 8})
    for (int gs : {-1, 32, 128, 96 /* 256 = 2 x 96 + 64 */})
      for (bool sym : {true, false}) {
        CAPTURE(bits, gs, sym);
        QuantSpec spec;
        spec.bits = bits;
        spec.group_size = gs;
        spec.sym = sym;
        const QuantResult r = Quantizer<RTN>(spec).quantize(TensorView::of(W.data(), {m, n}));
        const RefResult ref = rtn_ref(W, bits, gs, sym);
        int mismatched = 0;
        for (int i = 0; i < m; ++i)
          for (int j = 0; j < n; ++j) mismatched += r.codes(i, j) != ref.codes(i, j);
        CHECK(static_cast<double>(mismatched) / (m * n) <= tol::rtn_code_mismatch);
        CHECK(rel_diff(r.Q, ref.Q) < 1e-5);
        CHECK(r.g_idx == std::vector<std::int32_t>(ref.g_idx.begin(), ref.g_idx.end()));
        // Error budget per bit width: the RMS error of a uniform grid is at most
        // scale / sqrt(12) per entry on average, scale <= 2 max|w| / maxq.
        const double budget = 2.0 * W.cwiseAbs().maxCoeff() / ((1 << bits) - 1) / std::sqrt(12.0);
        CHECK(std::sqrt(r.loss / (m * n)) <= budget);
      }
}

TEST_CASE("RTN grid semantics follow the reference quantizer", "[rtn]") {
  // Row whose only non-zero value is positive: the range is widened to contain
  // zero, [0, 0.75]. The reference symmetrises only when xmin < 0, so the scale
  // is 0.75 / 15 with the zero point at (maxq + 1) / 2 = 8: the grid then spans
  // [-8, 7] * 0.05 and 0.75 clamps to 7 * 0.05 (a quirk of the reference kept
  // for compatibility).
  MatF W = MatF::Zero(2, 4);
  W(0, 2) = 0.75f;
  QuantSpec spec;
  spec.bits = 4;
  const QuantResult r = Quantizer<RTN>(spec).quantize(TensorView::of(W.data(), {2, 4}));
  CHECK(r.zeros(0, 0) == 8.f);
  CHECK(r.scales(0, 0) == Approx(0.75f / 15.f));
  CHECK(r.codes(0, 2) == 15);
  CHECK(r.Q(0, 2) == Approx(0.35f));
  CHECK(r.Q(0, 0) == 0.f);
  // An all-zero row gets the range [-1, 1] instead of a zero scale.
  CHECK(r.scales(1, 0) == Approx(2.f / 15.f));
  CHECK(r.Q.row(1).isZero(0));
  // Asymmetric: zero = round(-xmin / scale).
  W << -0.5f, 0.1f, 0.2f, 1.0f, 0.f, 0.f, 0.f, 0.f;
  spec.sym = false;
  const QuantResult a = Quantizer<RTN>(spec).quantize(TensorView::of(W.data(), {2, 4}));
  CHECK(a.scales(0, 0) == Approx(1.5f / 15.f));
  CHECK(a.zeros(0, 0) == 5.f);
  CHECK(a.codes(0, 3) == 15);
}

TEST_CASE("Clipping search never increases the p-norm error of the row", "[rtn]") {
  const int m = 32, n = 128;
  MatF W = realistic_weights(m, n, 3);
  W(0, 0) = 0.5f;  // an outlier makes clipping worthwhile
  QuantSpec spec;
  spec.bits = 3;
  const QuantResult plain = Quantizer<RTN>(spec).quantize(TensorView::of(W.data(), {m, n}));
  spec.mse = true;
  const QuantResult clipped = Quantizer<RTN>(spec).quantize(TensorView::of(W.data(), {m, n}));
  for (int i = 0; i < m; ++i) {
    double e_plain = 0, e_clip = 0;
    for (int j = 0; j < n; ++j) {
      e_plain += std::pow(std::abs(plain.Q(i, j) - W(i, j)), 2.4);
      e_clip += std::pow(std::abs(clipped.Q(i, j) - W(i, j)), 2.4);
    }
    CHECK(e_clip <= e_plain * (1 + 1e-5));
  }
  CHECK(clipped.scales(0, 0) <= plain.scales(0, 0));
  CHECK(clipped.loss < plain.loss);
}
