#include "reference.h"
#include "tolerances.h"

#include <catch2/catch.hpp>

using namespace normtweak;
using namespace normtweak::test;

namespace {

struct Case {
  int bits;
  int group_size;
  bool sym;
  bool act_order;
  bool static_groups;
};

QuantResult run_gptq(const MatF& W, MatF H, const Case& c, int blocksize = 128) {
  QuantSpec spec;
  spec.bits = c.bits;
  spec.group_size = c.group_size;
  spec.sym = c.sym;
  GPTQ::config cfg;
  cfg.blocksize = blocksize;
  cfg.act_order = c.act_order;
  cfg.static_groups = c.static_groups;
  return Quantizer<GPTQ>(spec, cfg).quantize(TensorView::of(W.data(), {W.rows(), W.cols()}),
                                             TensorView::of(H.data(), {H.rows(), H.cols()}));
}

}  // namespace

TEST_CASE("GPTQ matches the column-by-column double-precision reference", "[gptq]") {
  const int m = 96, n = 256;
  const MatF X = realistic_activations(2048, n, 11);
  const MatF W = realistic_weights(m, n, 12);
  const MatD Hd = hessian_ref(X);
  const MatF H = Hd.cast<float>();
  // Block size 64 < n forces several lazy batches, so the trailing GEMM update is exercised.
  auto c = GENERATE(Case{4, -1, true, false, false}, Case{3, 64, true, false, false}, Case{2, 32, false, false, false},
                    Case{4, 32, true, true, false}, Case{3, 64, false, true, true}, Case{4, 48, true, false, false} /* 256 = 5 x 48 + 16: a short last group */,
                    Case{8, -1, false, true, false});
  CAPTURE(c.bits, c.group_size, c.sym, c.act_order, c.static_groups);
  const QuantResult r = run_gptq(W, H, c, 64);
  const RefResult ref = gptq_ref(W, Hd, c.bits, c.group_size, c.sym, c.act_order, c.static_groups);
  int mismatched = 0;
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) mismatched += r.codes(i, j) != ref.codes(i, j);
  const double frac = static_cast<double>(mismatched) / (m * n);
  CAPTURE(frac, r.loss, ref.loss);
  CHECK(frac <= tol::gptq_code_mismatch);
  CHECK(std::abs(r.loss - ref.loss) / ref.loss <= tol::gptq_loss_rel);
  CHECK(rel_diff(r.Q, ref.Q) <= tol::gptq_weight_rel);
  CHECK(r.g_idx == std::vector<std::int32_t>(ref.g_idx.begin(), ref.g_idx.end()));
  // Dequantized weights are exactly scale * (code - zero) of their group.
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      const int g = r.g_idx[j];
      REQUIRE(r.Q(i, j) == r.scales(i, g) * (static_cast<float>(r.codes(i, j)) - r.zeros(i, g)));
    }
}

TEST_CASE("GPTQ's output error is below RTN's on correlated inputs with outliers", "[gptq]") {
  const int m = 128, n = 512;
  const ActivationModel model(n, 21);
  const MatF X = model.sample(4096, 1);
  const MatF Xtest = model.sample(1024, 2);  // held out: same distribution, other tokens
  const MatF W = realistic_weights(m, n, 22);
  const MatF H = hessian_ref(X).cast<float>();
  for (int bits : {4, 3, 2}) {
    for (int gs : {-1, 64, 128}) {
      QuantSpec spec;
      spec.bits = bits;
      spec.group_size = gs;
      const QuantResult rtn = Quantizer<RTN>(spec).quantize(TensorView::of(W.data(), {m, n}));
      const double e_rtn = output_error(X, W, rtn.Q);
      const QuantResult plain = run_gptq(W, H, {bits, gs, true, false, false});
      const QuantResult act = run_gptq(W, H, {bits, gs, true, true, false});
      const double e_plain = output_error(X, W, plain.Q), e_act = output_error(X, W, act.Q);
      CAPTURE(bits, gs, e_rtn, e_plain, e_act);
      CHECK(e_plain < e_rtn);
      CHECK(e_act < e_rtn);
      CHECK(e_act <= e_plain * (1 + tol::act_order_slack));
      // And on held-out tokens from the same distribution.
      CHECK(output_error(Xtest, W, plain.Q) < output_error(Xtest, W, rtn.Q));
    }
  }
}

TEST_CASE("GPTQ zeroes dead inputs and keeps g_idx consistent", "[gptq]") {
  const int m = 32, n = 128;
  MatF X = realistic_activations(1024, n, 31);
  X.col(5).setZero();
  X.col(77).setZero();
  const MatF W = realistic_weights(m, n, 32);
  const MatF H = hessian_ref(X).cast<float>();
  const QuantResult r = run_gptq(W, H, {4, 32, true, true, false});
  CHECK(r.Q.col(5).isZero(0));
  CHECK(r.Q.col(77).isZero(0));
  // Act-order groups: every group id holds exactly group_size columns.
  std::vector<int> count(n / 32, 0);
  for (int j = 0; j < n; ++j) ++count[r.g_idx[j]];
  for (int c : count) CHECK(c == 32);
  REQUIRE(r.perm.size() == static_cast<std::size_t>(n));
}

TEST_CASE("GPTQ retries with more damping, then falls back to RTN and says so", "[gptq]") {
  const int m = 16, n = 64;
  const MatF W = realistic_weights(m, n, 41);
  std::vector<std::string> messages;
  set_log_handler([&](log_level, const std::string& msg) { messages.push_back(msg); });

  SECTION("rank-deficient H: first attempt without damping fails, the retry succeeds") {
    const MatF X = realistic_activations(8, n, 42);  // 8 tokens: rank 8 < 64
    MatF H = hessian_ref(X).cast<float>();
    QuantSpec spec;
    GPTQ::config cfg;
    cfg.percdamp = 0.0;
    cfg.layer_name = "model.layers.0.mlp.down_proj";
    const QuantResult r = Quantizer<GPTQ>(spec, cfg).quantize(TensorView::of(W.data(), {m, n}),
                                                              TensorView::of(H.data(), {n, n}));
    CHECK_FALSE(r.fell_back_to_rtn);
    REQUIRE(messages.size() >= 1);
    CHECK_THAT(messages[0], Catch::Contains("model.layers.0.mlp.down_proj") && Catch::Contains("percdamp"));
  }
  SECTION("indefinite H: falls back to RTN with a warning naming layer and setting") {
    MatF H = MatF::Identity(n, n);
    H(0, 1) = H(1, 0) = 100.f;  // eigenvalue -99: no damping up to 10x mean(diag) fixes this
    QuantSpec spec;
    GPTQ::config cfg;
    cfg.layer_name = "blk.3.q";
    const QuantResult r = Quantizer<GPTQ>(spec, cfg).quantize(TensorView::of(W.data(), {m, n}),
                                                              TensorView::of(H.data(), {n, n}));
    CHECK(r.fell_back_to_rtn);
    const QuantResult rtn = Quantizer<RTN>(spec).quantize(TensorView::of(W.data(), {m, n}));
    CHECK(r.Q == rtn.Q);
    REQUIRE(!messages.empty());
    CHECK_THAT(messages.back(), Catch::Contains("blk.3.q") && Catch::Contains("RTN") && Catch::Contains("percdamp"));
  }
  set_log_handler({});
}

TEST_CASE("GPTQ rejects bad input with messages that name the values", "[gptq][errors]") {
  const int m = 8, n = 64;
  const MatF W = realistic_weights(m, n, 51);
  MatF H = MatF::Identity(n, n);
  QuantSpec spec;
  Quantizer<GPTQ> q(spec);
  SECTION("missing Hessian") {
    CHECK_THROWS_WITH(q.quantize(TensorView::of(W.data(), {m, n})), Catch::Contains("HessianAccumulator"));
  }
  SECTION("Hessian of the wrong size") {
    CHECK_THROWS_WITH(q.quantize(TensorView::of(W.data(), {m, n}), TensorView::of(H.data(), {n / 2, n / 2})),
                      Catch::Contains("in_features=64"));
  }
  SECTION("NaN in weights") {
    MatF Wbad = W;
    Wbad(3, 4) = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_WITH(q.quantize(TensorView::of(Wbad.data(), {m, n}), TensorView::of(H.data(), {n, n})),
                      Catch::Contains("1 NaN/Inf"));
  }
  SECTION("Inf in Hessian") {
    H(2, 2) = std::numeric_limits<float>::infinity();
    CHECK_THROWS_WITH(q.quantize(TensorView::of(W.data(), {m, n}), TensorView::of(H.data(), {n, n})),
                      Catch::Contains("H of layer") && Catch::Contains("NaN/Inf"));
  }
  SECTION("bits and group size") {
    QuantSpec s;
    s.bits = 9;
    CHECK_THROWS_WITH(Quantizer<GPTQ>(s), Catch::Contains("bits=9"));
    s.bits = 4;
    s.group_size = 0;
    CHECK_THROWS_WITH(Quantizer<GPTQ>(s), Catch::Contains("group_size=0"));
  }
  SECTION("config") {
    GPTQ::config c;
    c.blocksize = 0;
    CHECK_THROWS_WITH(Quantizer<GPTQ>(spec, c), Catch::Contains("blocksize=0"));
    c.blocksize = 128;
    c.percdamp = -1;
    CHECK_THROWS_WITH(Quantizer<GPTQ>(spec, c), Catch::Contains("percdamp=-1"));
  }
  SECTION("float16 weights are accepted and give the same result as their float32 values") {
    std::vector<std::uint16_t> W16(m * n);
    MatF W32(m, n);
    for (int i = 0; i < m * n; ++i) {
      W16[i] = detail::float_to_f16(W.data()[i]);
      W32.data()[i] = detail::f16_to_float(W16[i]);
    }
    const QuantResult a = q.quantize(TensorView(W16.data(), dtype::f16, {m, n}), TensorView::of(H.data(), {n, n}));
    const QuantResult b = q.quantize(TensorView::of(W32.data(), {m, n}), TensorView::of(H.data(), {n, n}));
    CHECK(a.Q == b.Q);
  }
}
