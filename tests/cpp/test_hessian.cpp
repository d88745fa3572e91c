#include "reference.h"
#include "tolerances.h"

#include <catch2/catch.hpp>

using namespace normtweak;
using namespace normtweak::test;

TEST_CASE("Hessian accumulation matches 2/n X^T X over any batch split", "[hessian]") {
  const int n = 96, T = 3000;
  const MatF X = realistic_activations(T, n, 7);
  const MatD ref = hessian_ref(X);
  for (int batch : {1, 17, 1000, 3000}) {
    CAPTURE(batch);
    HessianAccumulator<float> acc(n);
    HessianAccumulator<double> acc64(n);
    for (int r0 = 0; r0 < T; r0 += batch) {
      const int rows = std::min(batch, T - r0);
      acc.add_batch(TensorView::of(X.data() + r0 * n, {rows, n}));
      acc64.add_batch(TensorView::of(X.data() + r0 * n, {rows, n}));
    }
    CHECK(acc.nsamples() == T);
    CHECK(rel_diff(acc.hessian(), ref) <= tol::hessian_f32_rel);
    CHECK(rel_diff(acc64.hessian(), ref) <= tol::hessian_f64_rel);
    CHECK(acc.hessian().isApprox(acc.hessian().transpose(), 0));
  }
}

TEST_CASE("Hessian accepts float16, bfloat16, rank-3 and row-strided inputs", "[hessian]") {
  const int n = 64, T = 512;
  const MatF X = realistic_activations(T, n, 8);
  std::vector<std::uint16_t> h16(T * n), b16(T * n);
  MatF X16(T, n), XB(T, n);
  for (int i = 0; i < T * n; ++i) {
    h16[i] = detail::float_to_f16(X.data()[i]);
    b16[i] = detail::float_to_bf16(X.data()[i]);
    X16.data()[i] = detail::f16_to_float(h16[i]);
    XB.data()[i] = detail::bf16_to_float(b16[i]);
  }
  HessianAccumulator<double> a16(n), ab(n), a3(n), astr(n);
  a16.add_batch(TensorView(h16.data(), dtype::f16, {T, n}));
  ab.add_batch(TensorView(b16.data(), dtype::bf16, {4, T / 4, n}));
  CHECK(rel_diff(a16.hessian(), hessian_ref(X16)) <= tol::hessian_f64_rel);
  CHECK(rel_diff(ab.hessian(), hessian_ref(XB)) <= tol::hessian_f64_rel);
  // Every other row of X, through a strided view.
  a3.add_batch(TensorView(const_cast<float*>(X.data()), dtype::f32, {T / 2, n}, {2 * n, 1}));
  MatF Xeven(T / 2, n);
  for (int r = 0; r < T / 2; ++r) Xeven.row(r) = X.row(2 * r);
  CHECK(rel_diff(a3.hessian(), hessian_ref(Xeven)) <= tol::hessian_f64_rel);
  // Column-strided (transposed) input is converted, not rejected.
  const MatF Xt = X.transpose();
  astr.add_batch(TensorView(const_cast<float*>(Xt.data()), dtype::f32, {T, n}, {1, T}));
  CHECK(rel_diff(astr.hessian(), hessian_ref(X)) <= tol::hessian_f64_rel);
}

TEST_CASE("Hessian rejects bad activations", "[hessian][errors]") {
  HessianAccumulator<float> acc(32);
  MatF X = realistic_activations(16, 32, 9);
  CHECK_THROWS_WITH(acc.add_batch(TensorView::of(X.data(), {16, 16, 2})), Catch::Contains("in_features=32"));
  X(3, 3) = std::numeric_limits<float>::quiet_NaN();
  X(4, 4) = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH(acc.add_batch(TensorView::of(X.data(), {16, 32})), Catch::Contains("2 NaN/Inf"));
  std::vector<std::int32_t> ints(32);
  CHECK_THROWS_WITH(acc.add_batch(TensorView::of(ints.data(), {1, 32})), Catch::Contains("got int32"));
  int dummy = 0;
  CHECK_THROWS_WITH(acc.add_batch(TensorView(&dummy, dtype::f32, {1, 32}, {}, device::cuda(0))),
                    Catch::Contains("cuda:0"));
  CHECK_THROWS_WITH(HessianAccumulator<float>(0), Catch::Contains("columns > 0"));
}
