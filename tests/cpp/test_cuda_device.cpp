#define CATCH_CONFIG_RUNNER
// The CUDA path against the CPU path on a GPU: the core's entry points given
// CUDA tensors (dispatch through normtweak::cuda) must give the CPU's results
// within the tolerances of the host-driven kernel tests. Without a GPU the
// program exits with 77, which ctest reports as skipped.
#include "backend.h"
#include "reference.h"
#include "tolerances.h"

#include <catch2/catch.hpp>
#include <cuda_runtime.h>

#include <cstdio>

using namespace normtweak;
using namespace normtweak::test;

namespace {

template <typename T>
struct Dev {
  T* p = nullptr;
  std::int64_t n = 0;
  explicit Dev(std::int64_t n_) : n(n_) { REQUIRE(cudaMalloc(reinterpret_cast<void**>(&p), n * sizeof(T)) == cudaSuccess); }
  Dev(const T* host, std::int64_t n_) : Dev(n_) { REQUIRE(cudaMemcpy(p, host, n * sizeof(T), cudaMemcpyHostToDevice) == cudaSuccess); }
  ~Dev() { cudaFree(p); }
  std::vector<T> host() const {
    std::vector<T> out(n);
    REQUIRE(cudaMemcpy(out.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost) == cudaSuccess);
    return out;
  }
  TensorView view(std::initializer_list<std::int64_t> shape) const {
    return TensorView(p, dtype_of<T>::value, shape, {}, device::cuda(0));
  }
};

}  // namespace

TEST_CASE("GPTQ and RTN on the GPU match the CPU", "[cuda][gpu]") {
  const int m = 256, n = 512;
  const MatF W = realistic_weights(m, n, 21);
  const MatF X = realistic_activations(2048, n, 22);
  HessianAccumulator<float> cpu_h(n);
  cpu_h.add_batch(TensorView::of(X.data(), {2048, n}));
  cuda::HessianAccumulator gpu_h(n, 0);
  Dev<float> Xd(X.data(), 2048LL * n), Wd(W.data(), 1LL * m * n);
  gpu_h.add_batch(Xd.view({2048, n}), nullptr);
  const TensorView Hd = gpu_h.view(nullptr);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  std::vector<float> Hg(static_cast<std::size_t>(n) * n);
  REQUIRE(cudaMemcpy(Hg.data(), Hd.data(), Hg.size() * sizeof(float), cudaMemcpyDeviceToHost) == cudaSuccess);
  const auto& Hc = cpu_h.hessian();
  double num = 0, den = 0;
  for (std::size_t i = 0; i < Hg.size(); ++i) {
    num += std::pow(Hg[i] - Hc.data()[i], 2.0);
    den += std::pow(Hc.data()[i], 2.0);
  }
  CHECK(std::sqrt(num / den) <= tol::hessian_f32_rel);

  QuantSpec spec;
  spec.bits = 3;
  spec.group_size = 128;
  spec.sym = false;
  GPTQ::config cfg;
  cfg.act_order = true;
  const QuantResult ref = Quantizer<GPTQ>(spec, cfg).quantize(TensorView::of(W.data(), {m, n}), TensorView::of(Hc.data(), {n, n}));
  const QuantResult gpu = Quantizer<GPTQ>(spec, cfg).quantize(Wd.view({m, n}), Hd);
  std::int64_t differ = 0;
  for (std::int64_t i = 0; i < m * n; ++i) differ += gpu.codes.data()[i] != ref.codes.data()[i];
  CHECK(static_cast<double>(differ) / (m * n) <= tol::cuda_gptq_code_mismatch);
  CHECK(std::abs(gpu.loss - ref.loss) <= tol::cuda_gptq_loss_rel * ref.loss);

  const QuantResult rtn_ref = Quantizer<RTN>(spec).quantize(TensorView::of(W.data(), {m, n}));
  const QuantResult rtn_gpu = Quantizer<RTN>(spec).quantize(Wd.view({m, n}));
  CHECK(rtn_gpu.codes == rtn_ref.codes);
}

TEST_CASE("norm backward and the loss on the GPU match the CPU", "[cuda][gpu]") {
  const std::int64_t T = 512, C = 576;
  const MatF x = realistic_activations(static_cast<int>(T), static_cast<int>(C), 23);
  const MatF dy = realistic_activations(static_cast<int>(T), static_cast<int>(C), 24);
  std::vector<float> w(C, 1.1f), y(T * C), rstd(T), dx(T * C), dw(C);
  NormSpec spec;
  norm_forward(spec, TensorView::of(x.data(), {T, C}), TensorView::of(w.data(), {C}), nullptr,
               TensorView::of(y.data(), {T, C}), TensorView::of(rstd.data(), {T}), nullptr);
  norm_backward(spec, TensorView::of(x.data(), {T, C}), TensorView::of(w.data(), {C}), TensorView::of(dy.data(), {T, C}),
                TensorView::of(rstd.data(), {T}), nullptr, TensorView::of(dx.data(), {T, C}), TensorView::of(dw.data(), {C}),
                nullptr);
  Dev<float> xd(x.data(), T * C), wd(w.data(), C), dyd(dy.data(), T * C), rd(rstd.data(), T), dxd(T * C), dwd(C);
  norm_backward(spec, xd.view({T, C}), wd.view({C}), dyd.view({T, C}), rd.view({T}), nullptr, dxd.view({T, C}),
                dwd.view({C}), nullptr);
  const auto gdx = dxd.host(), gdw = dwd.host();
  for (std::int64_t i = 0; i < T * C; i += 97) CHECK(std::abs(gdx[i] - dx[i]) <= tol::cuda_norm_rel * (std::abs(dx[i]) + 1e-3));
  for (std::int64_t c = 0; c < C; ++c) CHECK(std::abs(gdw[c] - dw[c]) <= tol::cuda_norm_rel * (std::abs(dw[c]) + 1e-3));

  Dev<float> yd(y.data(), T * C), gq(T * C);
  for (DistLoss kind : {DistLoss::dist, DistLoss::reldist, DistLoss::mse, DistLoss::kl}) {
    const double cpu = channel_dist_loss(TensorView::of(x.data(), {T, C}), TensorView::of(y.data(), {T, C}), kind);
    const TensorView g = gq.view({T, C});
    const double gpu = channel_dist_loss(xd.view({T, C}), yd.view({T, C}), kind, &g);
    CHECK(std::abs(gpu - cpu) <= tol::cuda_device_loss_rel * std::abs(cpu));
  }
}

int main(int argc, char** argv) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("SKIPPED: no CUDA device here; these tests need a GPU (run ctest -R cuda_device on one)\n");
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
