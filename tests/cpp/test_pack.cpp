#include "reference.h"

#include <catch2/catch.hpp>

using namespace normtweak;
using namespace normtweak::test;

namespace {

// AutoGPTQ's packing loop (qlinear_cuda_old.py), transcribed as the
// specification of the layout: intweight [in, out] -> qweight [in*bits/32, out].
RowMatrix<std::int32_t> autogptq_pack(const Eigen::Matrix<std::uint32_t, -1, -1, Eigen::RowMajor>& intweight,
                                      int bits) {
  const int in = static_cast<int>(intweight.rows()), out = static_cast<int>(intweight.cols());
  RowMatrix<std::int32_t> packed(in / 32 * bits, out);
  for (int o = 0; o < out; ++o) {
    auto iw = [&](int j) { return intweight(j, o); };
    std::vector<std::uint32_t> q(static_cast<std::size_t>(in / 32 * bits), 0u);
    int i = 0, row = 0;
    while (row < static_cast<int>(q.size())) {
      if (bits == 2 || bits == 4 || bits == 8) {
        for (int j = i; j < i + 32 / bits; ++j) q[row] |= iw(j) << (bits * (j - i));
        i += 32 / bits;
        row += 1;
      } else {  // bits == 3
        for (int j = i; j < i + 10; ++j) q[row] |= iw(j) << (3 * (j - i));
        i += 10;
        q[row] |= iw(i) << 30;
        row += 1;
        q[row] |= (iw(i) >> 2) & 1u;
        i += 1;
        for (int j = i; j < i + 10; ++j) q[row] |= iw(j) << (3 * (j - i) + 1);
        i += 10;
        q[row] |= iw(i) << 31;
        row += 1;
        q[row] |= (iw(i) >> 1) & 3u;
        i += 1;
        for (int j = i; j < i + 10; ++j) q[row] |= iw(j) << (3 * (j - i) + 2);
        i += 10;
        row += 1;
      }
    }
    for (std::size_t r = 0; r < q.size(); ++r) packed(static_cast<int>(r), o) = static_cast<std::int32_t>(q[r]);
  }
  return packed;
}

}  // namespace

TEST_CASE("gptq packing follows AutoGPTQ's layout and round-trips exactly", "[pack]") {
  const int m = 64, n = 256;
  const MatF X = realistic_activations(1024, n, 61);
  const MatF W = realistic_weights(m, n, 62);
  MatF H = hessian_ref(X).cast<float>();
  for (int bits : {2, 3, 4, 8})
    for (int gs : {-1, 64})
      for (bool act : {false, true}) {
        CAPTURE(bits, gs, act);
        QuantSpec spec;
        spec.bits = bits;
        spec.group_size = gs;
        spec.sym = bits != 3;  // cover asymmetric zero points too
        GPTQ::config cfg;
        cfg.act_order = act;
        const QuantResult r =
            Quantizer<GPTQ>(spec, cfg).quantize(TensorView::of(W.data(), {m, n}), TensorView::of(H.data(), {n, n}));
        const GPTQPacked p = pack_gptq(r, bits);
        REQUIRE(p.qweight.rows() == n * bits / 32);
        REQUIRE(p.qweight.cols() == m);
        REQUIRE(p.qzeros.rows() == spec.num_groups(n));
        REQUIRE(p.qzeros.cols() == m * bits / 32);

        const Eigen::Matrix<std::uint32_t, -1, -1, Eigen::RowMajor> intweight = r.codes.transpose().cast<std::uint32_t>();
        CHECK(p.qweight == autogptq_pack(intweight, bits));

        const GPTQUnpacked u =
            unpack_gptq(TensorView::of(p.qweight.data(), {p.qweight.rows(), p.qweight.cols()}),
                        TensorView::of(p.qzeros.data(), {p.qzeros.rows(), p.qzeros.cols()}),
                        TensorView(const_cast<std::uint16_t*>(p.scales.data()), dtype::f16, {p.scales.rows(), p.scales.cols()}),
                        TensorView::of(p.g_idx.data(), {n}), bits);
        CHECK(u.codes == r.codes);
        CHECK(u.zeros == r.zeros);
        CHECK(u.g_idx == r.g_idx);
        // Scales go through float16: equal to the float16 rounding of the originals.
        for (int i = 0; i < m; ++i)
          for (int g = 0; g < r.scales.cols(); ++g)
            REQUIRE(u.scales(i, g) == detail::f16_to_float(detail::float_to_f16(r.scales(i, g))));
        // Dequantized with float16 scales: within float16 rounding of Q.
        CHECK(rel_diff(u.dequantize(), r.Q) < 1e-3);
      }
}

TEST_CASE("zero points of 0 and maxq survive the v1 zero - 1 convention", "[pack]") {
  const int m = 32, n = 32;
  RowMatrix<std::uint8_t> codes = RowMatrix<std::uint8_t>::Constant(m, n, 3);
  RowMatrix<float> scales = RowMatrix<float>::Constant(m, 1, 0.5f);
  RowMatrix<float> zeros(m, 1);
  for (int i = 0; i < m; ++i) zeros(i, 0) = static_cast<float>(i % 16);
  std::vector<std::int32_t> g(n, 0);
  const GPTQPacked p = pack_gptq(TensorView::of(codes.data(), {m, n}), TensorView::of(scales.data(), {m, 1}),
                                 TensorView::of(zeros.data(), {m, 1}), TensorView::of(g.data(), {n}), 4);
  const GPTQUnpacked u = unpack_gptq(TensorView::of(p.qweight.data(), {4, m}), TensorView::of(p.qzeros.data(), {1, 4}),
                                     TensorView(const_cast<std::uint16_t*>(p.scales.data()), dtype::f16, {1, m}),
                                     TensorView::of(g.data(), {n}), 4);
  CHECK(u.zeros == zeros);
}

TEST_CASE("packing rejects shapes the layout cannot hold", "[pack][errors]") {
  RowMatrix<std::uint8_t> codes = RowMatrix<std::uint8_t>::Zero(32, 48);
  RowMatrix<float> scales = RowMatrix<float>::Ones(32, 1), zeros = RowMatrix<float>::Constant(32, 1, 8.f);
  std::vector<std::int32_t> g(48, 0);
  auto pack = [&](int bits) {
    return pack_gptq(TensorView::of(codes.data(), {codes.rows(), codes.cols()}), TensorView::of(scales.data(), {32, 1}),
                     TensorView::of(zeros.data(), {32, 1}), TensorView::of(g.data(), {static_cast<std::int64_t>(g.size())}), bits);
  };
  CHECK_THROWS_WITH(pack(3), Catch::Contains("in_features=48 at bits=3"));
  CHECK_THROWS_WITH(pack(5), Catch::Contains("bits=5 has no gptq checkpoint layout"));
  codes = RowMatrix<std::uint8_t>::Constant(32, 64, 16);
  g.assign(64, 0);
  CHECK_THROWS_WITH(pack(4), Catch::Contains("code 16") && Catch::Contains("maxq=15"));
  codes.setZero();
  g[7] = 3;
  CHECK_THROWS_WITH(pack(4), Catch::Contains("g_idx[7]=3"));
}
