// The CUDA back-end's host side: argument checks, device memory, cuBLAS and
// cuSOLVER calls, kernel launches. Plain C++ (the kernels are in the .cu files).
#include "backend.h"

#include "gptq_kernel.h"
#include "loss_kernel.h"
#include "norm_kernel.h"
#include "rtn_kernel.h"

#include "normtweak/detail/quantizer-inl.h"  // effective_blocksize, init_result, layer_label

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <algorithm>
#include <initializer_list>
#include <memory>
#include <numeric>
#include <utility>
#include <vector>

namespace normtweak::cuda {

namespace {

void check(cudaError_t e, const char* what) {
  NT_CHECK(e == cudaSuccess, "CUDA error in {}: {}", what, cudaGetErrorString(e));
}
void check_launch(int e, const char* what) { check(static_cast<cudaError_t>(e), what); }
void check(cublasStatus_t s, const char* what) {
  NT_CHECK(s == CUBLAS_STATUS_SUCCESS, "cuBLAS error {} in {}", static_cast<int>(s), what);
}
void check(cusolverStatus_t s, const char* what) {
  NT_CHECK(s == CUSOLVER_STATUS_SUCCESS, "cuSOLVER error {} in {}", static_cast<int>(s), what);
}
#define NT_CU(call) check((call), #call)

// All named tensors on one CUDA device; makes it current for the scope.
class DeviceScope {
 public:
  DeviceScope(std::initializer_list<std::pair<const TensorView*, const char*>> ts) {
    const TensorView* first = nullptr;
    const char* first_name = "";
    for (auto [t, name] : ts) {
      if (!t || !t->data()) continue;
      NT_CHECK(on_cuda(*t), "{} is on {} but the other inputs are on CUDA; put all of them on one device", name,
               t->dev().str());
      if (!first) {
        first = t;
        first_name = name;
      } else {
        require_same_device(*first, first_name, *t, name);
      }
    }
    NT_CHECK(first != nullptr, "no CUDA tensor given");
    ordinal_ = first->dev().ordinal;
    NT_CU(cudaGetDevice(&saved_));
    NT_CU(cudaSetDevice(ordinal_));
  }
  ~DeviceScope() { cudaSetDevice(saved_); }
  int ordinal() const { return ordinal_; }

 private:
  int saved_ = 0, ordinal_ = 0;
};

// Stream-ordered device memory.
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer(std::size_t n, cudaStream_t s) : n_(n), s_(s) {
    if (n) NT_CU(cudaMallocAsync(reinterpret_cast<void**>(&p_), n * sizeof(T), s));
  }
  ~DeviceBuffer() {
    if (p_) cudaFreeAsync(p_, s_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  T* get() const { return p_; }
  std::size_t size() const { return n_; }

 private:
  T* p_ = nullptr;
  std::size_t n_;
  cudaStream_t s_;
};

template <typename T>
void to_host(std::vector<T>& dst, const T* src, std::size_t n, cudaStream_t s) {
  dst.resize(n);
  if (n) NT_CU(cudaMemcpyAsync(dst.data(), src, n * sizeof(T), cudaMemcpyDeviceToHost, s));
}

template <typename T>
void to_host(T* dst, const T* src, std::size_t n, cudaStream_t s) {
  if (n) NT_CU(cudaMemcpyAsync(dst, src, n * sizeof(T), cudaMemcpyDeviceToHost, s));
}

// One cuBLAS and one cuSOLVER handle per thread and device, created on first use.
struct Handles {
  cublasHandle_t blas = nullptr;
  cusolverDnHandle_t solver = nullptr;
};

Handles& handles(int device, cudaStream_t s) {
  thread_local std::vector<Handles> per_device;
  if (per_device.size() <= static_cast<std::size_t>(device)) per_device.resize(device + 1);
  Handles& h = per_device[device];
  if (!h.blas) NT_CU(cublasCreate(&h.blas));
  if (!h.solver) NT_CU(cusolverDnCreate(&h.solver));
  NT_CU(cublasSetStream(h.blas, s));
  NT_CU(cusolverDnSetStream(h.solver, s));
  return h;
}

// A dense float32 copy of a CUDA matrix view [m, n] whose rows are contiguous.
DeviceBuffer<float>* dense_copy(const TensorView& W, const char* name, cudaStream_t s,
                                std::unique_ptr<DeviceBuffer<float>>& out) {
  require_rank(W, 2, name);
  NT_CHECK(W.type() == dtype::f32, "{} on CUDA must be float32, got {}; convert it with .float()", name,
           dtype_name(W.type()));
  require_inner_contiguous(W, name);
  const std::int64_t m = W.size(0), n = W.size(1);
  out = std::make_unique<DeviceBuffer<float>>(static_cast<std::size_t>(m * n), s);
  if (m * n)
    NT_CU(cudaMemcpy2DAsync(out->get(), n * sizeof(float), W.data(), W.stride(0) * sizeof(float), n * sizeof(float),
                            m, cudaMemcpyDeviceToDevice, s));
  return out.get();
}

void require_cuda_f32(const TensorView& t, std::int64_t numel, const char* name) {
  NT_CHECK(t.type() == dtype::f32, "{} on CUDA must be float32, got {}", name, dtype_name(t.type()));
  require_contiguous(t, name);
  NT_CHECK(t.numel() == numel, "{} has {} elements, expected {}", name, t.numel(), numel);
}

}  // namespace

// ---- RTN -------------------------------------------------------------------------------------------

QuantResult rtn_quantize(const QuantSpec& spec, const std::string& layer, const TensorView& Wv, void* stream) {
  DeviceScope dev({{&Wv, "W"}});
  auto s = static_cast<cudaStream_t>(stream);
  std::unique_ptr<DeviceBuffer<float>> Wbuf;
  dense_copy(Wv, "W", s, Wbuf);
  const std::int64_t m = Wv.size(0), n = Wv.size(1), G = spec.num_groups(n);
  NT_CHECK(m > 0 && n > 0, "W of layer '{}' has an empty shape {}", detail::layer_label(layer), Wv.shape_str());
  spec.validate_for(n);
  QuantResult res;
  detail::init_result(res, spec, m, n, RTN::name);
  for (std::int64_t c = 0; c < n; ++c) res.g_idx[c] = spec.grouped() ? static_cast<std::int32_t>(c / spec.group_size) : 0;
  DeviceBuffer<float> Q(m * n, s), scales(m * G, s), zeros(m * G, s);
  DeviceBuffer<std::uint8_t> codes(m * n, s);
  DeviceBuffer<std::int32_t> g_idx(n, s);
  NT_CU(cudaMemcpyAsync(g_idx.get(), res.g_idx.data(), n * sizeof(std::int32_t), cudaMemcpyHostToDevice, s));
  const ClipSearch clip = spec.mse ? ClipSearch{spec.mse_norm, spec.mse_grid, spec.mse_maxshrink} : ClipSearch{};
  GptqBlockParams pp{Wbuf->get(), nullptr, nullptr, nullptr, scales.get(), zeros.get(), nullptr, nullptr, m, n, 0, 0, 0,
                     static_cast<std::int32_t>(spec.group_size), static_cast<std::int32_t>(G), spec.maxq(), spec.sym,
                     true, clip};
  check_launch(spec.grouped() ? launch_gptq_static_params(pp, s) : launch_gptq_row_params(pp, s), "RTN parameters");
  RtnParams rp{Wbuf->get(), Q.get(), codes.get(), scales.get(), zeros.get(), g_idx.get(), m, n, n,
               static_cast<std::int32_t>(G), spec.maxq()};
  check_launch(launch_rtn(rp, s), "launch_rtn");
  RowMatrix<float> W(m, n);
  res.Q.resize(m, n);
  to_host(W.data(), Wbuf->get(), m * n, s);
  to_host(res.Q.data(), Q.get(), m * n, s);
  to_host(res.codes.data(), codes.get(), m * n, s);
  to_host(res.scales.data(), scales.get(), m * G, s);
  to_host(res.zeros.data(), zeros.get(), m * G, s);
  NT_CU(cudaStreamSynchronize(s));
  res.loss = (W - res.Q).cast<double>().squaredNorm();
  return res;
}

// ---- GPTQ ------------------------------------------------------------------------------------------

QuantResult gptq_quantize(const QuantSpec& spec, const GPTQ::config& cfg, const TensorView& Wv, const TensorView& Hv,
                          void* stream) {
  DeviceScope dev({{&Wv, "W"}, {&Hv, "H"}});
  auto s = static_cast<cudaStream_t>(stream);
  Handles& h = handles(dev.ordinal(), s);
  std::unique_ptr<DeviceBuffer<float>> Wbuf, Hbuf;
  dense_copy(Wv, "W", s, Wbuf);
  const std::int64_t m = Wv.size(0), n = Wv.size(1), G = spec.num_groups(n);
  spec.validate_for(n);
  NT_CHECK(Hv.rank() == 2 && Hv.size(0) == n && Hv.size(1) == n, "H has shape {} but layer '{}' has in_features={}",
           Hv.shape_str(), detail::layer_label(cfg.layer_name), n);
  dense_copy(Hv, "H", s, Hbuf);

  QuantResult res;
  detail::init_result(res, spec, m, n, GPTQ::name);
  DeviceBuffer<float> scales(m * G, s), zeros(m * G, s), Err(m * cfg.blocksize, s), U(n * n, s), A(n * n, s),
      Wp(m * n, s);
  DeviceBuffer<std::uint8_t> codes(m * n, s);
  DeviceBuffer<double> row_loss(m, s);
  DeviceBuffer<std::int32_t> perm_d(n, s);
  NT_CU(cudaMemsetAsync(row_loss.get(), 0, m * sizeof(double), s));
  const ClipSearch clip = spec.mse ? ClipSearch{spec.mse_norm, spec.mse_grid, spec.mse_maxshrink} : ClipSearch{};
  GptqBlockParams p{Wbuf->get(), U.get(), codes.get(), Err.get(), scales.get(), zeros.get(), perm_d.get(),
                    row_loss.get(), m, n, 0, 0, cfg.blocksize, static_cast<std::int32_t>(spec.group_size),
                    static_cast<std::int32_t>(G), spec.maxq(), spec.sym, cfg.static_groups, clip};
  // Per-channel parameters from the weights before dead columns are zeroed (as on the CPU).
  if (!spec.grouped()) check_launch(launch_gptq_row_params(p, s), "GPTQ row parameters");

  // diag(H) on the host: dead inputs and the act-order permutation.
  std::vector<float> diag(n);
  NT_CU(cudaMemcpy2DAsync(diag.data(), sizeof(float), Hbuf->get(), (n + 1) * sizeof(float), sizeof(float), n,
                          cudaMemcpyDeviceToHost, s));
  NT_CU(cudaStreamSynchronize(s));
  const float one = 1.f;
  for (std::int64_t i = 0; i < n; ++i)
    if (diag[i] == 0.f) {
      diag[i] = 1.f;
      NT_CU(cudaMemcpyAsync(Hbuf->get() + i * n + i, &one, sizeof(float), cudaMemcpyHostToDevice, s));
      NT_CU(cudaMemset2DAsync(Wbuf->get() + i, n * sizeof(float), 0, sizeof(float), m, s));
    }
  if (spec.grouped() && cfg.static_groups) check_launch(launch_gptq_static_params(p, s), "GPTQ static groups");
  std::vector<std::int32_t> perm(n);
  std::iota(perm.begin(), perm.end(), 0);
  if (cfg.act_order)
    std::stable_sort(perm.begin(), perm.end(), [&](std::int32_t a, std::int32_t b) { return diag[a] > diag[b]; });
  NT_CU(cudaMemcpyAsync(perm_d.get(), perm.data(), n * sizeof(std::int32_t), cudaMemcpyHostToDevice, s));
  if (cfg.act_order) {
    check_launch(launch_permute_columns(Wbuf->get(), Wp.get(), perm_d.get(), m, n, s), "act-order permutation");
    NT_CU(cudaMemcpyAsync(Wbuf->get(), Wp.get(), m * n * sizeof(float), cudaMemcpyDeviceToDevice, s));
  }

  // U from cuSOLVER, retrying with more damping as the CPU does.
  const double mean_diag = std::accumulate(diag.begin(), diag.end(), 0.0) / static_cast<double>(n);
  auto more_damping = [](double pd) { return pd > 0.0 ? pd * 10.0 : 0.01; };
  const int ni = static_cast<int>(n);
  int lwork = 0;
  NT_CU(cusolverDnSpotrf_bufferSize(h.solver, CUBLAS_FILL_MODE_LOWER, ni, A.get(), ni, &lwork));
  DeviceBuffer<float> work(static_cast<std::size_t>(std::max(lwork, 1)), s);
  DeviceBuffer<int> info_d(1, s);
  std::size_t dev_bytes = 0, host_bytes = 0;
  NT_CU(cusolverDnXtrtri_bufferSize(h.solver, CUBLAS_FILL_MODE_LOWER, CUBLAS_DIAG_NON_UNIT, n, CUDA_R_32F, A.get(), n,
                                    &dev_bytes, &host_bytes));
  DeviceBuffer<char> trtri_work(std::max<std::size_t>(dev_bytes, 1), s);
  std::vector<char> trtri_host(std::max<std::size_t>(host_bytes, 1));
  double percdamp = cfg.percdamp;
  int info = 0;
  for (int attempt = 0;; ++attempt) {
    check_launch(launch_hinv_gather(Hbuf->get(), A.get(), perm_d.get(), static_cast<float>(percdamp * mean_diag), n, s),
                 "Hessian gather");
    NT_CU(cusolverDnSpotrf(h.solver, CUBLAS_FILL_MODE_LOWER, ni, A.get(), ni, work.get(), lwork, info_d.get()));
    NT_CU(cudaMemcpyAsync(&info, info_d.get(), sizeof(int), cudaMemcpyDeviceToHost, s));
    NT_CU(cudaStreamSynchronize(s));
    if (info == 0) {
      NT_CU(cusolverDnXtrtri(h.solver, CUBLAS_FILL_MODE_LOWER, CUBLAS_DIAG_NON_UNIT, n, CUDA_R_32F, A.get(), n,
                             trtri_work.get(), dev_bytes, trtri_host.data(), host_bytes, info_d.get()));
      NT_CU(cudaMemcpyAsync(&info, info_d.get(), sizeof(int), cudaMemcpyDeviceToHost, s));
      NT_CU(cudaStreamSynchronize(s));
    }
    if (info == 0 || attempt == cfg.damp_retries) break;
    warn("layer '{}': Hessian is not positive definite with percdamp={} (leading minor {} fails); retrying with "
         "percdamp={}",
         detail::layer_label(cfg.layer_name), percdamp, info, more_damping(percdamp));
    percdamp = more_damping(percdamp);
  }
  if (info != 0) {
    warn("layer '{}': Hessian is not positive definite even with percdamp={}; quantizing this layer with RTN "
         "instead. Calibrate with more tokens (nsamples/seqlen) or raise percdamp",
         detail::layer_label(cfg.layer_name), percdamp);
    QuantResult rtn = rtn_quantize(spec, cfg.layer_name, Wv, stream);
    rtn.fell_back_to_rtn = true;
    return rtn;
  }
  res.percdamp = percdamp;
  check_launch(launch_hinv_finish(A.get(), U.get(), n, s), "inverse factor");

  // Blocks of columns: the row kernel, then the lazy update of the columns to
  // the right, W[:, i2:] -= Err[:, :count] U[i1:i2, i2:] (row-major), which is
  // W^T -= U^T Err^T in cuBLAS's column-major terms.
  const std::int64_t B = detail::effective_blocksize(spec, cfg);
  p.ld_err = B;
  const float minus_one = -1.f, plus_one = 1.f;
  for (std::int64_t i1 = 0; i1 < n; i1 += B) {
    const std::int64_t i2 = std::min(i1 + B, n);
    p.i1 = i1;
    p.i2 = i2;
    check_launch(launch_gptq_block(p, s), "GPTQ block");
    if (i2 < n)
      NT_CU(cublasSgemm(h.blas, CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(n - i2), static_cast<int>(m),
                        static_cast<int>(i2 - i1), &minus_one, U.get() + i1 * n + i2, ni, Err.get(),
                        static_cast<int>(B), &plus_one, Wbuf->get() + i2, ni));
  }

  RowMatrix<float> Wq(m, n);
  RowMatrix<std::uint8_t> cq(m, n);
  std::vector<double> loss;
  to_host(Wq.data(), Wbuf->get(), m * n, s);
  to_host(cq.data(), codes.get(), m * n, s);
  to_host(res.scales.data(), scales.get(), m * G, s);
  to_host(res.zeros.data(), zeros.get(), m * G, s);
  to_host(loss, row_loss.get(), m, s);
  NT_CU(cudaStreamSynchronize(s));
  res.loss = std::accumulate(loss.begin(), loss.end(), 0.0);
  auto group_of = [&](std::int64_t i) -> std::int32_t {
    if (!spec.grouped()) return 0;
    return static_cast<std::int32_t>(cfg.static_groups ? perm[i] / spec.group_size : i / spec.group_size);
  };
  for (std::int64_t i = 0; i < n; ++i) res.g_idx[perm[i]] = group_of(i);
  res.Q.resize(m, n);
  for (std::int64_t r = 0; r < m; ++r)
    for (std::int64_t i = 0; i < n; ++i) {
      res.Q(r, perm[i]) = Wq(r, i);
      res.codes(r, perm[i]) = cq(r, i);
    }
  if (cfg.act_order) res.perm = std::move(perm);
  return res;
}

// ---- norm backward and the loss -------------------------------------------------------------------

void norm_forward(const NormSpec& spec, const TensorView& x, const TensorView& w, const TensorView* b,
                  const TensorView& y, const TensorView& rstd, const TensorView* mean, void* stream) {
  const bool layer = spec.kind == NormSpec::Kind::layer;
  DeviceScope dev({{&x, "x"}, {&w, "weight"}, {b, "bias"}, {&y, "y"}, {&rstd, "rstd"}, {mean, "mean"}});
  NT_CHECK(x.rank() >= 1, "x must have at least one dimension");
  NT_CHECK(spec.eps >= 0.f, "norm eps={} must be non-negative", spec.eps);
  const std::int64_t C = x.size(-1), T = C ? x.numel() / C : 0;
  require_cuda_f32(x, T * C, "x");
  require_cuda_f32(w, C, "weight");
  require_cuda_f32(y, T * C, "y");
  require_cuda_f32(rstd, T, "rstd");
  NT_CHECK(!layer || (mean && mean->data()), "LayerNorm forward needs an output for the per-row mean");
  if (layer) require_cuda_f32(*mean, T, "mean");
  const bool with_b = b && b->data();
  NT_CHECK(!with_b || layer, "RMSNorm has no bias, but a bias tensor was given");
  if (with_b) require_cuda_f32(*b, C, "bias");
  NormFwdParams p{x.data_as<const float>(), w.data_as<const float>(), with_b ? b->data_as<const float>() : nullptr,
                  y.data_as<float>(), rstd.data_as<float>(), layer ? mean->data_as<float>() : nullptr, T, C, spec.eps,
                  spec.unit_offset ? 1.f : 0.f, layer};
  check_launch(launch_norm_forward(p, stream), "norm forward");
}

void norm_backward(const NormSpec& spec, const TensorView& x, const TensorView& w, const TensorView& dy,
                   const TensorView& rstd, const TensorView* mean, const TensorView& dx, const TensorView& dw,
                   const TensorView* db, void* stream) {
  const bool layer = spec.kind == NormSpec::Kind::layer;
  DeviceScope dev({{&x, "x"}, {&w, "weight"}, {&dy, "dy"}, {&rstd, "rstd"}, {mean, "mean"}, {&dx, "dx"},
                   {&dw, "dw"}, {db, "db"}});
  NT_CHECK(x.rank() >= 1, "x must have at least one dimension");
  const std::int64_t C = x.size(-1), T = C ? x.numel() / C : 0;
  require_cuda_f32(x, T * C, "x");
  require_cuda_f32(w, C, "weight");
  require_cuda_f32(dy, T * C, "dy");
  require_cuda_f32(rstd, T, "rstd");
  require_cuda_f32(dx, T * C, "dx");
  require_cuda_f32(dw, C, "dw");
  NT_CHECK(!layer || (mean && mean->data()), "LayerNorm backward needs the per-row mean saved by the forward pass");
  if (layer) require_cuda_f32(*mean, T, "mean");
  const bool with_db = db && db->data();
  if (with_db) require_cuda_f32(*db, C, "db");
  NormBwdParams p{x.data_as<const float>(), w.data_as<const float>(), dy.data_as<const float>(),
                  rstd.data_as<const float>(), layer ? mean->data_as<const float>() : nullptr, dx.data_as<float>(),
                  dw.data_as<float>(), with_db ? db->data_as<float>() : nullptr, T, C, spec.unit_offset ? 1.f : 0.f};
  check_launch(launch_norm_backward(p, stream), "norm backward");
}

double channel_dist_loss(const TensorView& f, const TensorView& q, DistLoss kind, const TensorView* grad_q,
                         void* stream) {
  DeviceScope dev({{&f, "f (float output)"}, {&q, "q (quantized output)"}, {grad_q, "grad_q"}});
  auto s = static_cast<cudaStream_t>(stream);
  NT_CHECK(f.rank() == q.rank() && f.numel() == q.numel() && f.rank() >= 1 && f.size(-1) == q.size(-1),
           "float output has shape {} but quantized output has shape {}; they must match", f.shape_str(), q.shape_str());
  const std::int64_t C = f.size(-1), T = C ? f.numel() / C : 0;
  NT_CHECK(T > 0, "ChannelDistLoss needs at least one token, got shape {}", f.shape_str());
  require_cuda_f32(f, T * C, "f (float output)");
  require_cuda_f32(q, T * C, "q (quantized output)");
  float* g = nullptr;
  if (grad_q && grad_q->data()) {
    require_cuda_f32(*grad_q, T * C, "grad_q");
    g = grad_q->data_as<float>();
  }
  std::vector<double> terms;
  if (kind == DistLoss::dist || kind == DistLoss::reldist) {
    DeviceBuffer<double> term(C, s);
    DeviceBuffer<float> a(C, s), b(C, s), mu(C, s);
    DistLossParams p{f.data_as<const float>(), q.data_as<const float>(), g, term.get(), a.get(), b.get(), mu.get(),
                     T, C, kind == DistLoss::reldist};
    check_launch(launch_dist_loss(p, s), "distribution loss");
    to_host(terms, term.get(), C, s);
    NT_CU(cudaStreamSynchronize(s));
    return std::accumulate(terms.begin(), terms.end(), 0.0) / static_cast<double>(C);
  }
  if (kind == DistLoss::mse) {
    DeviceBuffer<double> term(T * C, s);
    MseLossParams p{f.data_as<const float>(), q.data_as<const float>(), g, term.get(), T * C};
    check_launch(launch_mse_loss(p, s), "MSE loss");
    to_host(terms, term.get(), T * C, s);
  } else {
    DeviceBuffer<double> term(T, s);
    KlLossParams p{f.data_as<const float>(), q.data_as<const float>(), g, term.get(), T, C};
    check_launch(launch_kl_loss(p, s), "KL loss");
    to_host(terms, term.get(), T, s);
  }
  NT_CU(cudaStreamSynchronize(s));
  return std::accumulate(terms.begin(), terms.end(), 0.0);
}

// ---- Hessian ---------------------------------------------------------------------------------------

HessianAccumulator::HessianAccumulator(std::int64_t columns, int device) : n_(columns), device_(device) {
  NT_CHECK(columns > 0, "HessianAccumulator needs a positive number of columns, got {}", columns);
  int saved = 0;
  NT_CU(cudaGetDevice(&saved));
  NT_CU(cudaSetDevice(device));
  NT_CU(cudaMalloc(reinterpret_cast<void**>(&H_), static_cast<std::size_t>(n_ * n_) * sizeof(float)));
  NT_CU(cudaMemset(H_, 0, static_cast<std::size_t>(n_ * n_) * sizeof(float)));
  cublasHandle_t hb = nullptr;
  NT_CU(cublasCreate(&hb));
  handle_ = hb;
  cudaSetDevice(saved);
}

HessianAccumulator::~HessianAccumulator() {
  if (handle_) cublasDestroy(static_cast<cublasHandle_t>(handle_));
  if (H_) cudaFree(H_);
}

void HessianAccumulator::add_batch(const TensorView& X, void* stream) {
  DeviceScope dev({{&X, "X"}});
  NT_CHECK(dev.ordinal() == device_, "X is on cuda:{} but this HessianAccumulator lives on cuda:{}", dev.ordinal(),
           device_);
  NT_CHECK(X.rank() >= 1 && X.size(-1) == n_, "X has shape {} but the layer has in_features={}", X.shape_str(), n_);
  require_inner_contiguous(X, "X");
  const TensorView X2 = X.flatten_2d("X");
  const std::int64_t T = X2.size(0);
  if (T == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  auto hb = static_cast<cublasHandle_t>(handle_);
  NT_CU(cublasSetStream(hb, s));
  const std::int64_t total = nsamples_ + T;
  const float beta = static_cast<float>(static_cast<double>(nsamples_) / static_cast<double>(total));
  const float alpha = static_cast<float>(2.0 / static_cast<double>(total));
  const int n = static_cast<int>(n_), k = static_cast<int>(T), ld = static_cast<int>(X2.stride(0));
  // Row-major X [T, n] is column-major X^T [n, T]: C = X^T X is op(A) op(A)^T with A = X^T.
  if (X2.type() == dtype::f32) {
    NT_CU(cublasSsyrk(hb, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, n, k, &alpha, X2.data_as<const float>(), ld, &beta, H_,
                      n));
    symmetric_ = false;
  } else {
    NT_CHECK(X2.type() == dtype::f16 || X2.type() == dtype::bf16,
             "X on CUDA must be float32, float16 or bfloat16, got {}", dtype_name(X2.type()));
    const cudaDataType_t t = X2.type() == dtype::f16 ? CUDA_R_16F : CUDA_R_16BF;
    // GemmEx updates the full matrix; a pending SYRK's missing half is mirrored first.
    if (!symmetric_) check_launch(launch_mirror_upper(H_, n_, s), "Hessian mirror");
    symmetric_ = true;
    NT_CU(cublasGemmEx(hb, CUBLAS_OP_N, CUBLAS_OP_T, n, n, k, &alpha, X2.data(), t, ld, X2.data(), t, ld, &beta, H_,
                       CUDA_R_32F, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
  nsamples_ = total;
}

TensorView HessianAccumulator::view(void* stream) {
  if (!symmetric_) {
    int saved = 0;
    NT_CU(cudaGetDevice(&saved));
    NT_CU(cudaSetDevice(device_));
    check_launch(launch_mirror_upper(H_, n_, stream), "Hessian mirror");
    cudaSetDevice(saved);
    symmetric_ = true;
  }
  return TensorView(H_, dtype::f32, {n_, n_}, {}, device::cuda(device_));
}

// ---- dispatch --------------------------------------------------------------------------------------

namespace {

QuantResult gptq_entry(const QuantSpec& spec, int blocksize, double percdamp, bool act_order, bool static_groups,
                       int damp_retries, const std::string& layer, const TensorView& W, const TensorView& H,
                       void* stream) {
  GPTQ::config cfg;
  cfg.blocksize = blocksize;
  cfg.percdamp = percdamp;
  cfg.act_order = act_order;
  cfg.static_groups = static_groups;
  cfg.damp_retries = damp_retries;
  cfg.layer_name = layer;
  return gptq_quantize(spec, cfg, W, H, stream);
}

const CudaBackend kBackend{&rtn_quantize, &gptq_entry, &norm_forward, &norm_backward, &channel_dist_loss};

}  // namespace

void register_backend() { cuda_backend_slot() = &kBackend; }

}  // namespace normtweak::cuda
