// ChannelDistLoss, LayerNorm/RMSNorm and NormTweaker against double-precision
// reference twins written from the paper's equations, and gradients against
// central finite differences of those twins.
#include "reference.h"

#include <catch2/catch.hpp>

using namespace normtweak;
using namespace normtweak::test;

namespace tol_nt {
// float32 forward vs double reference: per-channel sums over a few hundred
// tokens, relative error ~1e-6; 1e-5 leaves room for summation order.
constexpr double forward_rel = 1e-5;
// Analytic float32 gradient vs central differences (h = 1e-3 relative) of the
// double reference: truncation error O(h^2) ~ 1e-6 and float rounding ~1e-6.
constexpr double grad_rel = 1e-3;
}  // namespace tol_nt

namespace {

double dist_ref(const MatD& f, const MatD& q, DistLoss kind) {
  const double T = f.rows(), C = f.cols();
  if (kind == DistLoss::mse) return (q - f).squaredNorm() / (T * C);
  if (kind == DistLoss::kl) {
    double s = 0;
    for (int t = 0; t < f.rows(); ++t) {
      const Eigen::RowVectorXd lf = f.row(t).array() - std::log(f.row(t).array().exp().sum());
      const Eigen::RowVectorXd lq = q.row(t).array() - std::log(q.row(t).array().exp().sum());
      s += (lf.array().exp() * (lf - lq).array()).sum();
    }
    return s / T;
  }
  const Eigen::RowVectorXd mf = f.colwise().mean(), mq = q.colwise().mean();
  const Eigen::RowVectorXd vf = (f.rowwise() - mf).array().square().colwise().mean();
  const Eigen::RowVectorXd vq = (q.rowwise() - mq).array().square().colwise().mean();
  if (kind == DistLoss::reldist) {  // each channel in units of its float spread
    const Eigen::ArrayXXd v = vf.array() + kRelDistVarFloor;
    return ((mf - mq).cwiseAbs().array() / v.sqrt() + (vf - vq).cwiseAbs().array() / v).sum() / C;
  }
  return ((mf - mq).cwiseAbs() + (vf - vq).cwiseAbs()).sum() / C;
}

// y = norm(x) in double; w_eff = w (+1 for Gemma).
MatD norm_ref(const MatD& x, const Eigen::RowVectorXd& w, const Eigen::RowVectorXd* b, bool layer, double eps,
              bool unit_offset) {
  MatD y(x.rows(), x.cols());
  for (int t = 0; t < x.rows(); ++t) {
    const double mu = layer ? x.row(t).mean() : 0.0;
    const Eigen::RowVectorXd d = x.row(t).array() - mu;
    const double r = 1.0 / std::sqrt(d.squaredNorm() / x.cols() + eps);
    y.row(t) = (d * r).cwiseProduct((w.array() + (unit_offset ? 1.0 : 0.0)).matrix());
    if (b) y.row(t) += *b;
  }
  return y;
}

TensorView view(const MatF& m) { return TensorView::of(m.data(), {m.rows(), m.cols()}); }

}  // namespace

TEST_CASE("ChannelDistLoss forward and backward match the reference twin", "[loss]") {
  const int T = 300, C = 48;
  const MatF f = realistic_activations(T, C, 1) * 0.1f;
  MatF q = f;
  std::mt19937 rng(2);
  std::normal_distribution<float> N(0.f, 0.05f);
  for (int i = 0; i < q.size(); ++i) q.data()[i] += N(rng) + 0.01f;  // a shifted, noisier copy
  for (DistLoss kind : {DistLoss::dist, DistLoss::reldist, DistLoss::mse, DistLoss::kl}) {
    CAPTURE(static_cast<int>(kind));
    MatF g(T, C);
    const TensorView gv = view(g);
    const double L = channel_dist_loss(view(f), view(q), kind, &gv);
    const MatD fd = f.cast<double>(), qd = q.cast<double>();
    const double Lref = dist_ref(fd, qd, kind);
    CHECK(std::abs(L - Lref) / Lref <= tol_nt::forward_rel);
    // Central differences on a sample of entries.
    double num = 0, den = 0;
    for (int k = 0; k < 40; ++k) {
      const int t = (k * 37) % T, c = (k * 11) % C;
      const double h = 1e-3 * std::max(1e-2, std::abs(qd(t, c)));
      MatD qp = qd, qm = qd;
      qp(t, c) += h;
      qm(t, c) -= h;
      const double fdiff = (dist_ref(fd, qp, kind) - dist_ref(fd, qm, kind)) / (2 * h);
      num += (fdiff - g(t, c)) * (fdiff - g(t, c));
      den += fdiff * fdiff;
    }
    CHECK(std::sqrt(num / den) <= tol_nt::grad_rel);
  }
  CHECK_THROWS_WITH(dist_loss_from_string("l1"), Catch::Contains("loss='l1'"));
  const MatF short_q = q.topRows(10);
  CHECK_THROWS_WITH(channel_dist_loss(view(f), view(short_q), DistLoss::dist), Catch::Contains("must match"));
}

TEST_CASE("Norm forward/backward match the reference twin and finite differences", "[norm]") {
  const int T = 64, C = 40;
  const MatF x = realistic_activations(T, C, 3);
  std::mt19937 rng(4);
  std::normal_distribution<float> N(0.f, 1.f);
  Eigen::RowVectorXf w(C), b(C);
  for (int c = 0; c < C; ++c) {
    w[c] = 1.f + 0.2f * N(rng);
    b[c] = 0.1f * N(rng);
  }
  MatF dy(T, C);
  for (int i = 0; i < dy.size(); ++i) dy.data()[i] = N(rng);
  struct Case {
    NormSpec::Kind kind;
    bool bias, offset;
  };
  for (Case cs : {Case{NormSpec::Kind::rms, false, false}, Case{NormSpec::Kind::rms, false, true},
                  Case{NormSpec::Kind::layer, true, false}, Case{NormSpec::Kind::layer, false, false}}) {
    const bool layer = cs.kind == NormSpec::Kind::layer;
    CAPTURE(layer, cs.bias, cs.offset);
    NormSpec spec;
    spec.kind = cs.kind;
    spec.eps = 1e-5f;
    spec.unit_offset = cs.offset;
    MatF y(T, C), dx(T, C);
    std::vector<float> rstd(T), mean(T), dw(C), db(C);
    const TensorView wv = TensorView::of(w.data(), {C}), bv = TensorView::of(b.data(), {C});
    const TensorView mv = TensorView::of(mean.data(), {T}), dbv = TensorView::of(db.data(), {C});
    norm_forward(spec, view(x), wv, cs.bias ? &bv : nullptr, view(y), TensorView::of(rstd.data(), {T}), &mv);
    const Eigen::RowVectorXd wd = w.cast<double>(), bd = b.cast<double>();
    const MatD xd = x.cast<double>();
    auto ref = [&](const MatD& xx, const Eigen::RowVectorXd& ww, const Eigen::RowVectorXd& bb) {
      return norm_ref(xx, ww, cs.bias ? &bb : nullptr, layer, 1e-5, cs.offset);
    };
    CHECK(rel_diff(y, ref(xd, wd, bd)) <= tol_nt::forward_rel);
    norm_backward(spec, view(x), wv, view(dy), TensorView::of(rstd.data(), {T}), &mv, view(dx),
                  TensorView::of(dw.data(), {C}), cs.bias ? &dbv : nullptr);
    // Scalar objective S = sum(dy * y): its gradients are exactly dx, dw, db.
    const MatD dyd = dy.cast<double>();
    auto S = [&](const MatD& xx, const Eigen::RowVectorXd& ww, const Eigen::RowVectorXd& bb) {
      return (ref(xx, ww, bb).array() * dyd.array()).sum();
    };
    double num = 0, den = 0;
    for (int k = 0; k < 30; ++k) {
      const int t = (k * 13) % T, c = (k * 7) % C;
      const double h = 1e-3 * std::max(1.0, std::abs(xd(t, c)));
      MatD xp = xd, xm = xd;
      xp(t, c) += h;
      xm(t, c) -= h;
      const double fdiff = (S(xp, wd, bd) - S(xm, wd, bd)) / (2 * h);
      num += (fdiff - dx(t, c)) * (fdiff - dx(t, c));
      den += fdiff * fdiff;
    }
    CHECK(std::sqrt(num / den) <= tol_nt::grad_rel);
    num = den = 0;
    for (int c = 0; c < C; ++c) {
      Eigen::RowVectorXd wp = wd, wm = wd;
      wp[c] += 1e-4;
      wm[c] -= 1e-4;
      const double fdiff = (S(xd, wp, bd) - S(xd, wm, bd)) / 2e-4;
      num += (fdiff - dw[c]) * (fdiff - dw[c]);
      den += fdiff * fdiff;
    }
    CHECK(std::sqrt(num / den) <= tol_nt::grad_rel);
    if (cs.bias)
      for (int c = 0; c < C; ++c) CHECK(db[c] == Approx(dyd.col(c).sum()).epsilon(1e-5));
  }
  NormSpec spec;
  std::vector<float> w3(3);
  MatF y(T, C);
  std::vector<float> rstd(T);
  CHECK_THROWS_WITH(norm_forward(spec, view(x), TensorView::of(w3.data(), {3}), nullptr, view(y),
                                 TensorView::of(rstd.data(), {T}), nullptr),
                    Catch::Contains("norm weight has 3 elements but x has 40 channels"));
}

TEST_CASE("NormTweaker is Adam with the paper's layer schedule", "[tweaker]") {
  TweakConfig cfg;
  cfg.lr0 = 1e-3;
  cfg.scale = 5.0;
  NormTweaker tw(cfg, 30);
  CHECK(tw.lr(0) == Approx(1e-3));
  CHECK(tw.lr(15) == Approx(1e-3 * (1 + 5.0 * 15 / 30)));
  CHECK_THROWS_WITH(tw.lr(30), Catch::Contains("layer 30"));
  std::vector<float> p = {1.f, -2.f, 0.5f};
  const std::vector<double> p0 = {1.0, -2.0, 0.5};
  tw.begin_layer(3, {TensorView::of(p.data(), {3})});
  std::vector<double> m(3, 0), v(3, 0), pd = p0;
  const double lr = tw.lr(3);
  for (int s = 1; s <= 3; ++s) {
    std::vector<float> g = {0.1f * s, -0.3f, 2.0f / s};
    tw.step({TensorView::of(g.data(), {3})});
    for (int k = 0; k < 3; ++k) {  // Kingma & Ba, Algorithm 1
      m[k] = 0.9 * m[k] + 0.1 * g[k];
      v[k] = 0.999 * v[k] + 0.001 * g[k] * g[k];
      const double mh = m[k] / (1 - std::pow(0.9, s)), vh = v[k] / (1 - std::pow(0.999, s));
      pd[k] -= lr * mh / (std::sqrt(vh) + 1e-8);
    }
  }
  for (int k = 0; k < 3; ++k) CHECK(p[k] == Approx(pd[k]).epsilon(1e-6));
  cfg.lr0 = -1;
  CHECK_THROWS_WITH(NormTweaker(cfg, 30), Catch::Contains("tweak lr=-1"));
}

TEST_CASE("Tweaking a norm weight with the distribution loss pulls its output toward the float one", "[tweaker]") {
  // Float: RMSNorm(x; w_f). "Quantized": the same norm with a distorted weight.
  const int T = 512, C = 32;
  const MatF x = realistic_activations(T, C, 5);
  Eigen::RowVectorXf wf = Eigen::RowVectorXf::Ones(C), wq(C);
  for (int c = 0; c < C; ++c) wq[c] = 1.f + 0.3f * std::sin(static_cast<float>(c));
  NormSpec spec;
  MatF f(T, C), q(T, C), g(T, C), dx(T, C);
  std::vector<float> rstd(T), dw(C);
  const TensorView rv = TensorView::of(rstd.data(), {T});
  norm_forward(spec, view(x), TensorView::of(wf.data(), {C}), nullptr, view(f), rv, nullptr);
  TweakConfig cfg;
  cfg.lr0 = 1e-2;
  NormTweaker tw(cfg, 1);
  tw.begin_layer(0, {TensorView::of(wq.data(), {C})});
  double first = 0, last = 0;
  for (int it = 0; it < 200; ++it) {
    norm_forward(spec, view(x), TensorView::of(wq.data(), {C}), nullptr, view(q), rv, nullptr);
    const TensorView gv = view(g);
    const double L = channel_dist_loss(view(f), view(q), DistLoss::dist, &gv);
    if (it == 0) first = L;
    last = L;
    norm_backward(spec, view(x), TensorView::of(wq.data(), {C}), gv, rv, nullptr, view(dx),
                  TensorView::of(dw.data(), {C}), nullptr);
    tw.step({TensorView::of(dw.data(), {C})});
  }
  CAPTURE(first, last);
  CHECK(last < 0.1 * first);
  CHECK((wq - wf).cwiseAbs().maxCoeff() < 0.05f);
}
