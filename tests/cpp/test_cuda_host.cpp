// The CUDA kernels' bodies driven on the CPU over every block and thread of a
// launch, against the CPU path.
#include "gptq_kernel.h"
#include "loss_kernel.h"
#include "norm_kernel.h"
#include "pack_kernel.h"
#include "reference.h"
#include "rtn_kernel.h"
#include "tolerances.h"

#include "normtweak/detail/quantizer-inl.h"  // detail::hinv_upper, effective_blocksize, init_result

#include <catch2/catch.hpp>

#include <algorithm>
#include <numeric>
#include <tuple>

using namespace normtweak;
using namespace normtweak::test;

TEST_CASE("RTN kernel body reproduces Quantizer<RTN> over a whole launch", "[cuda][host]") {
  const int m = 37, n = 256;  // rows not a multiple of anything: exercises the grid-stride tail
  const MatF W = realistic_weights(m, n, 3);
  for (int gs : {-1, 64}) {
    QuantSpec spec;
    spec.bits = 3;
    spec.group_size = gs;
    const QuantResult ref = Quantizer<RTN>(spec).quantize(TensorView::of(W.data(), {m, n}));
    RowMatrix<float> Q(m, n);
    RowMatrix<std::uint8_t> codes(m, n);
    cuda::RtnParams p{W.data(), Q.data(), codes.data(), ref.scales.data(), ref.zeros.data(), ref.g_idx.data(),
                      m, n, n, static_cast<std::int32_t>(ref.scales.cols()), spec.maxq()};
    // A deliberately small grid so each thread strides over several elements.
    const std::int64_t grid = 7;
    for (std::int64_t b = 0; b < grid; ++b)
      for (std::int64_t t = 0; t < cuda::kRtnBlock; ++t) cuda::rtn_thread(p, b, t, cuda::kRtnBlock, grid);
    CHECK(Q == ref.Q);
    CHECK(codes == ref.codes);
    CHECK(cuda::rtn_grid(p) == (m * n + 255) / 256);
  }
}

// ---- norm backward ---------------------------------------------------------------------------------

namespace {

// The block reduction of the row kernel: warps of 32 lanes summed, then the warp sums.
cuda::RowSums emulate_block_sum(const std::vector<cuda::RowSums>& parts) {
  std::vector<cuda::RowSums> warps;
  for (std::size_t w = 0; w < parts.size(); w += 32) {
    cuda::RowSums s;
    for (std::size_t l = w; l < std::min(parts.size(), w + 32); ++l) s = s + parts[l];
    warps.push_back(s);
  }
  cuda::RowSums total;
  for (const auto& s : warps) total = total + s;
  return total;
}

double max_rel(const float* a, const float* b, std::int64_t n) {
  double num = 0.0, den = 0.0;
  for (std::int64_t i = 0; i < n; ++i) {
    num = std::max(num, std::abs(static_cast<double>(a[i]) - b[i]));
    den = std::max(den, std::abs(static_cast<double>(b[i])));
  }
  return num / std::max(den, 1e-30);
}

}  // namespace

TEST_CASE("norm forward and backward kernel bodies reproduce the CPU path over a whole launch", "[cuda][host]") {
  const std::int64_t T = 19, C = 300;  // C not a multiple of the block: threads past the end idle
  const MatF x = realistic_activations(static_cast<int>(T), static_cast<int>(C), 5);
  MatF dyf = realistic_activations(static_cast<int>(T), static_cast<int>(C), 6);
  std::vector<float> w(C), b(C);
  for (std::int64_t c = 0; c < C; ++c) {
    w[c] = 0.5f + 0.01f * static_cast<float>(c % 37);
    b[c] = 0.1f * static_cast<float>(c % 5);
  }
  for (auto [kind, offset, bias] : {std::tuple{NormSpec::Kind::rms, false, false},
                                    std::tuple{NormSpec::Kind::rms, true, false},
                                    std::tuple{NormSpec::Kind::layer, false, true}}) {
    NormSpec spec;
    spec.kind = kind;
    spec.unit_offset = offset;
    const bool layer = kind == NormSpec::Kind::layer;
    std::vector<float> y(T * C), rstd(T), mean(T), dx(T * C), dw(C), db(C);
    const auto xv = TensorView::of(x.data(), {T, C});
    const auto wv = TensorView::of(w.data(), {C}), bv = TensorView::of(b.data(), {C});
    const auto yv = TensorView::of(y.data(), {T, C}), rv = TensorView::of(rstd.data(), {T}),
               mv = TensorView::of(mean.data(), {T});
    norm_forward(spec, xv, wv, bias ? &bv : nullptr, yv, rv, layer ? &mv : nullptr);
    const auto dyv = TensorView::of(dyf.data(), {T, C}), dxv = TensorView::of(dx.data(), {T, C}),
               dwv = TensorView::of(dw.data(), {C}), dbv = TensorView::of(db.data(), {C});
    norm_backward(spec, xv, wv, dyv, rv, layer ? &mv : nullptr, dxv, dwv, bias ? &dbv : nullptr);

    // Forward: one block per row, two block reductions (LayerNorm's mean, then the squares).
    std::vector<float> ky(T * C, -1.f), krstd(T, -1.f), kmean(T, -1.f);
    cuda::NormFwdParams fp{x.data(), w.data(), bias ? b.data() : nullptr, ky.data(), krstd.data(),
                           layer ? kmean.data() : nullptr, T, C, spec.eps, offset ? 1.f : 0.f, layer};
    for (std::int64_t t = 0; t < T; ++t) {
      double mu = 0.0, ss = 0.0;
      if (layer) {
        for (int tid = 0; tid < cuda::kNormRowThreads; ++tid) mu += cuda::norm_fwd_row_sum(fp, t, tid, cuda::kNormRowThreads);
        mu /= static_cast<double>(C);
      }
      for (int tid = 0; tid < cuda::kNormRowThreads; ++tid) ss += cuda::norm_fwd_row_sq(fp, t, tid, cuda::kNormRowThreads, mu);
      for (int tid = 0; tid < cuda::kNormRowThreads; ++tid) cuda::norm_fwd_row_write(fp, t, tid, cuda::kNormRowThreads, mu, ss);
    }
    CHECK(max_rel(ky.data(), y.data(), T * C) <= tol::cuda_norm_rel);
    CHECK(max_rel(krstd.data(), rstd.data(), T) <= tol::cuda_norm_rel);
    if (layer) CHECK(max_rel(kmean.data(), mean.data(), T) <= tol::cuda_norm_rel);

    std::vector<float> kdx(T * C, -1.f), kdw(C, -1.f), kdb(C, -1.f);
    cuda::NormBwdParams p{x.data(), w.data(), dyf.data(), rstd.data(), layer ? mean.data() : nullptr,
                          kdx.data(), kdw.data(), bias ? kdb.data() : nullptr, T, C, offset ? 1.f : 0.f};
    const int nt = cuda::kNormRowThreads;
    for (std::int64_t t = 0; t < T; ++t) {  // one block per row
      std::vector<cuda::RowSums> parts;
      for (int tid = 0; tid < nt; ++tid) parts.push_back(cuda::norm_bwd_row_partial(p, t, tid, nt));
      const cuda::RowSums total = emulate_block_sum(parts);
      for (int tid = 0; tid < nt; ++tid) cuda::norm_bwd_row_dx(p, t, tid, nt, total);
    }
    const std::int64_t blocks = (C + cuda::kNormColThreads - 1) / cuda::kNormColThreads;
    for (std::int64_t blk = 0; blk < blocks; ++blk)
      for (int tid = 0; tid < cuda::kNormColThreads; ++tid) {
        const std::int64_t c = blk * cuda::kNormColThreads + tid;
        if (c < C) cuda::norm_bwd_param_column(p, c);
      }
    CAPTURE(layer, offset);
    CHECK(max_rel(kdx.data(), dx.data(), T * C) <= tol::cuda_norm_rel);
    CHECK(max_rel(kdw.data(), dw.data(), C) <= tol::cuda_norm_rel);
    if (bias) CHECK(max_rel(kdb.data(), db.data(), C) <= tol::cuda_norm_rel);
  }
}

// ---- Norm Tweaking loss ----------------------------------------------------------------------------

TEST_CASE("loss kernel bodies reproduce channel_dist_loss (dist, mse, kl)", "[cuda][host]") {
  const std::int64_t T = 64, C = 96;
  const MatF f = realistic_activations(static_cast<int>(T), static_cast<int>(C), 7);
  MatF q = f;
  const MatF noise = realistic_activations(static_cast<int>(T), static_cast<int>(C), 8);
  q += 0.05f * noise;
  const auto fv = TensorView::of(f.data(), {T, C}), qv = TensorView::of(q.data(), {T, C});
  for (DistLoss kind : {DistLoss::dist, DistLoss::reldist, DistLoss::mse, DistLoss::kl}) {
    std::vector<float> g(T * C), kg(T * C, -1.f);
    const auto gv = TensorView::of(g.data(), {T, C});
    const double loss = channel_dist_loss(fv, qv, kind, &gv);
    double kloss = 0.0;
    if (kind == DistLoss::dist || kind == DistLoss::reldist) {
      std::vector<double> term(C);
      std::vector<float> a(C), b(C), mu(C);
      cuda::DistLossParams p{f.data(), q.data(), kg.data(), term.data(), a.data(), b.data(), mu.data(), T, C,
                             kind == DistLoss::reldist};
      for (std::int64_t c = 0; c < C; ++c) cuda::dist_loss_channel(p, c);
      for (std::int64_t i = 0; i < T * C; ++i) cuda::dist_loss_grad(p, i);
      for (double v : term) kloss += v;
      kloss /= static_cast<double>(C);
    } else if (kind == DistLoss::mse) {
      std::vector<double> term(T * C);
      cuda::MseLossParams p{f.data(), q.data(), kg.data(), term.data(), T * C};
      for (std::int64_t i = 0; i < T * C; ++i) cuda::mse_loss_element(p, i);
      for (double v : term) kloss += v;
    } else {
      std::vector<double> term(T);
      cuda::KlLossParams p{f.data(), q.data(), kg.data(), term.data(), T, C};
      for (std::int64_t t = 0; t < T; ++t) cuda::kl_loss_row(p, t);
      for (double v : term) kloss += v;
    }
    CAPTURE(static_cast<int>(kind));
    CHECK(std::abs(kloss - loss) <= tol::cuda_loss_rel * std::abs(loss));
    CHECK(max_rel(kg.data(), g.data(), T * C) <= tol::cuda_norm_rel);
  }
}

// ---- packing ---------------------------------------------------------------------------------------

TEST_CASE("pack kernel bodies write the same words as pack_gptq", "[cuda][host]") {
  const int m = 64, n = 256;
  const MatF W = realistic_weights(m, n, 11);
  for (int bits : {2, 3, 4, 8}) {
    QuantSpec spec;
    spec.bits = bits;
    spec.group_size = 64;
    spec.sym = false;
    const QuantResult r = Quantizer<RTN>(spec).quantize(TensorView::of(W.data(), {m, n}));
    const std::int64_t G = r.scales.cols();
    const GPTQPacked ref = pack_gptq(TensorView::of(r.codes.data(), {m, n}), TensorView::of(r.scales.data(), {m, G}),
                                     TensorView::of(r.zeros.data(), {m, G}), TensorView::of(r.g_idx.data(), {n}), bits);
    RowMatrix<std::int32_t> qw(n * bits / 32, m), qz(G, m * bits / 32);
    cuda::PackParams p{r.codes.data(), r.zeros.data(), qw.data(), qz.data(), m, n, G, bits};
    for (std::int64_t w = 0; w < qw.rows(); ++w)
      for (std::int64_t o = 0; o < m; ++o) cuda::pack_qweight_word(p, w, o);
    for (std::int64_t g = 0; g < G; ++g)
      for (std::int64_t w = 0; w < qz.cols(); ++w) cuda::pack_qzeros_word(p, g, w);
    CAPTURE(bits);
    CHECK(qw == ref.qweight);
    CHECK(qz == ref.qzeros);
  }
}

// ---- GPTQ in-block column loop ---------------------------------------------------------------------

namespace {

// The GPU's route to U (U^T U = H^-1): the gather kernel's A, then what
// cuSOLVER's potrf + trtri (lower) leave in the column-major buffer (here from
// Eigen, in double, rounded to float), then the finishing kernel.
RowMatrix<float> gptq_factor_with_kernel_bodies(const RowMatrix<float>& H, const std::vector<std::int32_t>& perm,
                                                float damp) {
  const std::int64_t n = H.rows();
  RowMatrix<float> A(n, n), U(n, n);
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t j = 0; j < n; ++j) cuda::hinv_gather_element(H.data(), A.data(), perm.data(), damp, n, i, j);
  const MatD L = A.cast<double>().llt().matrixL();
  const MatD Linv = L.triangularView<Eigen::Lower>().solve(MatD::Identity(n, n));
  const Eigen::MatrixXf colmajor = Linv.cast<float>();  // column-major, as cuSOLVER stores it
  for (std::int64_t a = 0; a < n; ++a)
    for (std::int64_t b = 0; b < n; ++b) cuda::hinv_finish_element(colmajor.data(), U.data(), n, a, b);
  return U;
}

// Quantizer<GPTQ>'s flow with the in-block loop replaced by the kernel body,
// one "thread" per row; the factor and the lazy update as the CPU computes
// them (cuSOLVER and cuBLAS on the GPU).
QuantResult gptq_with_kernel_body(const QuantSpec& spec, const GPTQ::config& cfg, const MatF& W0, const MatF& H0) {
  const std::int64_t m = W0.rows(), n = W0.cols();
  MatF W = W0;
  RowMatrix<float> H = H0;
  QuantResult res;
  detail::init_result(res, spec, m, n, "gptq");
  const std::int64_t G = spec.num_groups(n);
  std::vector<double> row_loss(m, 0.0);
  const ClipSearch clip = spec.mse ? ClipSearch{spec.mse_norm, spec.mse_grid, spec.mse_maxshrink} : ClipSearch{};
  cuda::GptqBlockParams p{W.data(), nullptr, nullptr, nullptr, res.scales.data(), res.zeros.data(), nullptr,
                          row_loss.data(), m, n, 0, 0, 0, static_cast<std::int32_t>(spec.group_size),
                          static_cast<std::int32_t>(G), spec.maxq(), spec.sym, cfg.static_groups, clip};
  if (!spec.grouped())
    for (std::int64_t r = 0; r < m; ++r) cuda::gptq_row_params(p, r);
  for (std::int64_t i = 0; i < n; ++i)
    if (H(i, i) == 0.f) {
      H(i, i) = 1.f;
      W.col(i).setZero();
    }
  if (spec.grouped() && cfg.static_groups)
    for (std::int64_t r = 0; r < m; ++r) cuda::gptq_static_params(p, r);
  std::vector<std::int32_t> perm(n);
  std::iota(perm.begin(), perm.end(), 0);
  if (cfg.act_order) {
    std::stable_sort(perm.begin(), perm.end(), [&](std::int32_t a, std::int32_t b) { return H(a, a) > H(b, b); });
    MatF Wp(m, n);
    for (std::int64_t r = 0; r < m; ++r)
      for (std::int64_t i = 0; i < n; ++i) cuda::permute_columns_element(W.data(), Wp.data(), perm.data(), n, r, i);
    W = Wp;
  }
  const float damp = static_cast<float>(cfg.percdamp * H.diagonal().cast<double>().mean());
  RowMatrix<float> Hinv = gptq_factor_with_kernel_bodies(H, perm, damp);
  RowMatrix<float> cpu_factor;
  REQUIRE(detail::hinv_upper(H, perm, damp, cpu_factor) == 0);
  CHECK((Hinv - cpu_factor).norm() <= tol::cuda_hinv_rel * cpu_factor.norm());
  const std::int64_t B = detail::effective_blocksize(spec, cfg);
  MatF Err(m, B);
  RowMatrix<std::uint8_t> codes(m, n);
  p.W = W.data();
  p.Hinv = Hinv.data();
  p.codes = codes.data();
  p.Err = Err.data();
  p.perm = perm.data();
  p.ld_err = B;
  for (std::int64_t i1 = 0; i1 < n; i1 += B) {
    const std::int64_t i2 = std::min(i1 + B, n);
    p.i1 = i1;
    p.i2 = i2;
    // A launch of row blocks: threads past the last row return at once, like the kernel's guard.
    const std::int64_t blocks = (m + cuda::kGptqThreads - 1) / cuda::kGptqThreads;
    for (std::int64_t b = 0; b < blocks; ++b)
      for (std::int64_t t = 0; t < cuda::kGptqThreads; ++t)
        if (b * cuda::kGptqThreads + t < m) cuda::gptq_block_row(p, b * cuda::kGptqThreads + t);
    if (i2 < n)
      W.rightCols(n - i2).noalias() -= Err.leftCols(i2 - i1) * Hinv.block(i1, i2, i2 - i1, n - i2);
  }
  res.loss = std::accumulate(row_loss.begin(), row_loss.end(), 0.0);
  res.Q.resize(m, n);
  for (std::int64_t r = 0; r < m; ++r)
    for (std::int64_t i = 0; i < n; ++i) {
      res.Q(r, perm[i]) = W(r, i);
      res.codes(r, perm[i]) = codes(r, i);
    }
  return res;
}

}  // namespace

TEST_CASE("GPTQ kernel body reproduces Quantizer<GPTQ> (groups, act-order, static groups, clipping)", "[cuda][host]") {
  const int m = 150, n = 320;  // m spans two row blocks; n: a short last group of 64 at group 128
  const MatF W = realistic_weights(m, n, 13);
  const MatF X = realistic_activations(1024, n, 14);
  MatF H = (2.0f / 1024.f) * (X.transpose() * X);
  H.row(7).setZero();  // a dead input
  H.col(7).setZero();
  struct Case {
    int bits, gs;
    bool sym, act_order, static_groups, mse;
  };
  for (const Case c : {Case{3, 128, false, true, false, false}, Case{4, -1, true, false, false, false},
                       Case{2, 64, false, true, true, false}, Case{3, 32, true, false, false, true}}) {
    QuantSpec spec;
    spec.bits = c.bits;
    spec.group_size = c.gs;
    spec.sym = c.sym;
    spec.mse = c.mse;
    GPTQ::config cfg;
    cfg.act_order = c.act_order;
    cfg.static_groups = c.static_groups;
    const QuantResult ref = Quantizer<GPTQ>(spec, cfg).quantize(TensorView::of(W.data(), {m, n}),
                                                                TensorView::of(H.data(), {n, n}));
    const QuantResult k = gptq_with_kernel_body(spec, cfg, W, H);
    CAPTURE(c.bits, c.gs, c.sym, c.act_order, c.static_groups, c.mse);
    std::int64_t differ = 0;
    for (std::int64_t i = 0; i < m * n; ++i) differ += k.codes.data()[i] != ref.codes.data()[i];
    CHECK(static_cast<double>(differ) / (m * n) <= tol::cuda_gptq_code_mismatch);
    CHECK(std::abs(k.loss - ref.loss) <= tol::cuda_gptq_loss_rel * ref.loss);
    CHECK((k.scales - ref.scales).norm() <= tol::cuda_gptq_scale_rel * ref.scales.norm());
  }
}
