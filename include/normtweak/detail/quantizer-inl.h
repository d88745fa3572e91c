// Bodies of Quantizer<RTN> and Quantizer<GPTQ>. Included by src/quantizer.cpp
// for the explicit instantiations, or by rtn.h/gptq.h when
// NORMTWEAK_HEADER_ONLY is defined.
#pragma once

#include "normtweak/detail/convert.h"
#include "normtweak/detail/linalg.h"
#include "normtweak/cuda_dispatch.h"
#include "normtweak/gptq.h"
#include "normtweak/log.h"
#include "normtweak/rtn.h"
#include "normtweak/threading.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace normtweak {
namespace detail {

inline std::string layer_label(const std::string& name) { return name.empty() ? std::string("<unnamed>") : name; }

inline RowMatrix<float> load_weights(const TensorView& W, const std::string& layer) {
  require_rank(W, 2, "W");
  require_cpu(W, "W");
  require_floating(W, "W");
  const std::int64_t m = W.size(0), n = W.size(1);
  NT_CHECK(m > 0 && n > 0, "W of layer '{}' has an empty shape {}", layer_label(layer), W.shape_str());
  RowMatrix<float> out(m, n);
  const std::int64_t bad = copy_rows<float>(W, 0, m, out.data());
  NT_CHECK(bad == 0, "W of layer '{}' contains {} NaN/Inf values; the weights are broken, check the checkpoint",
           layer_label(layer), bad);
  return out;
}

inline void init_result(QuantResult& res, const QuantSpec& spec, std::int64_t m, std::int64_t n, const char* method) {
  const std::int64_t G = spec.num_groups(n);
  res.method = method;
  res.codes.resize(m, n);
  res.scales.resize(m, G);
  res.zeros.resize(m, G);
  res.g_idx.assign(static_cast<std::size_t>(n), 0);
}

inline QuantResult quantize_impl(RTN, const QuantSpec& spec, const RTN::config& cfg, const TensorView& Wv,
                                 const TensorView&) {
  if (on_cuda(Wv)) return cuda_backend_for(Wv, "W").rtn(spec, cfg.layer_name, Wv, cuda_stream_slot());
  QuantResult res;
  res.Q = load_weights(Wv, cfg.layer_name);
  const std::int64_t m = res.Q.rows(), n = res.Q.cols();
  spec.validate_for(n);
  init_result(res, spec, m, n, RTN::name);
  const std::int64_t gs = spec.grouped() ? spec.group_size : n, G = spec.num_groups(n);
  const int maxq = spec.maxq();
  for (std::int64_t c = 0; c < n; ++c) res.g_idx[c] = spec.grouped() ? static_cast<std::int32_t>(c / gs) : 0;
  std::vector<double> row_loss(static_cast<std::size_t>(m), 0.0);
#pragma omp parallel for num_threads(num_threads()) schedule(static)
  for (std::int64_t r = 0; r < m; ++r) {
    float* w = res.Q.data() + r * n;
    std::uint8_t* code = res.codes.data() + r * n;
    double loss = 0.0;
    for (std::int64_t g = 0; g < G; ++g) {
      const std::int64_t width = spec.group_width(g, n);
      const QuantParams p = find_params(w + g * gs, width, 1, spec);
      res.scales(r, g) = p.scale;
      res.zeros(r, g) = p.zero;
      for (std::int64_t c = g * gs; c < g * gs + width; ++c) {
        const float x = w[c];
        const float qc = quantize_code(x, p, maxq);
        const float q = dequantize_code(qc, p);
        code[c] = static_cast<std::uint8_t>(qc);
        w[c] = q;
        loss += static_cast<double>(x - q) * static_cast<double>(x - q);
      }
    }
    row_loss[r] = loss;
  }
  res.loss = std::accumulate(row_loss.begin(), row_loss.end(), 0.0);
  return res;
}

// Upper Cholesky factor U of H^-1 (U^T U = H^-1), computed as
// U = J chol(J H J)^-1 J with J the reversal permutation: one Cholesky and one
// triangular inverse instead of the reference's Cholesky, inverse and second
// Cholesky. `order` maps working column i to the row/column of H it takes
// (act-order), `damp` is added to the diagonal. Returns the LAPACK info (0 on
// success); on success Hinv holds U.
inline int hinv_upper(const RowMatrix<float>& H, const std::vector<std::int32_t>& order, float damp,
                      RowMatrix<float>& Hinv) {
  const std::int64_t n = H.rows();
  Hinv.resize(n, n);
#pragma omp parallel for num_threads(num_threads()) schedule(static)
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t hi = order[n - 1 - i];
    for (std::int64_t j = 0; j <= i; ++j) Hinv(i, j) = H(hi, order[n - 1 - j]);
    Hinv(i, i) += damp;
  }
  const int ni = static_cast<int>(n);
  int info = cholesky_lower(ni, Hinv.data(), ni);
  if (info == 0) info = invert_lower(ni, Hinv.data(), ni);
  if (info != 0) return info;
  // Rotate by 180 degrees: the lower-triangular inverse becomes U (upper).
  // Strictly lower entries land in the strictly upper triangle, which holds
  // nothing yet; the diagonal is reversed separately.
#pragma omp parallel for num_threads(num_threads()) schedule(static)
  for (std::int64_t i = 1; i < n; ++i) {
    for (std::int64_t j = 0; j < i; ++j) {
      Hinv(n - 1 - i, n - 1 - j) = Hinv(i, j);
      Hinv(i, j) = 0.f;
    }
  }
  for (std::int64_t i = 0; i < n / 2; ++i) std::swap(Hinv(i, i), Hinv(n - 1 - i, n - 1 - i));
  return 0;
}

// Columns per lazy batch. Group parameters are computed from the current
// (error-updated) weights when a group starts; a group must therefore not
// start inside one batch and end inside the next, or it would see columns
// that still miss this batch's updates. (The reference reads the stale copy
// in that case; we keep the column-by-column algorithm's semantics instead.)
inline std::int64_t effective_blocksize(const QuantSpec& spec, const GPTQ::config& cfg) {
  std::int64_t B = cfg.blocksize;
  if (spec.grouped() && !cfg.static_groups) {
    const std::int64_t gs = spec.group_size;
    if (B % gs != 0 && gs % B != 0) B = std::gcd(B, gs);
  }
  return B;
}

inline RowMatrix<float> load_hessian(const TensorView& Hv, std::int64_t n, const std::string& layer) {
  NT_CHECK(Hv.data() != nullptr && Hv.numel() > 0,
           "GPTQ needs the Hessian H [in_features, in_features] of layer '{}'; accumulate it with HessianAccumulator",
           layer_label(layer));
  require_rank(Hv, 2, "H");
  require_cpu(Hv, "H");
  NT_CHECK(Hv.type() == dtype::f32 || Hv.type() == dtype::f64, "H must be float32 or float64, got {}",
           dtype_name(Hv.type()));
  NT_CHECK(Hv.size(0) == n && Hv.size(1) == n, "H has shape {} but W of layer '{}' has in_features={}; expected [{}, {}]",
           Hv.shape_str(), layer_label(layer), n, n, n);
  RowMatrix<float> H(n, n);
  const std::int64_t bad = copy_rows<float>(Hv, 0, n, H.data());
  NT_CHECK(bad == 0, "H of layer '{}' contains {} NaN/Inf values; check the calibration activations",
           layer_label(layer), bad);
  return H;
}

// Group of working column i (after the act-order permutation).
inline std::int64_t gptq_group(const QuantSpec& spec, const GPTQ::config& cfg, const std::vector<std::int32_t>& perm,
                               std::int64_t i) {
  if (!spec.grouped()) return 0;
  return cfg.static_groups ? perm[i] / spec.group_size : i / spec.group_size;
}

// The in-block column loop runs on tiles of kGptqLanes rows held column-major
// (tile[k][lane]): every step of the sequential column recurrence then works
// on kGptqLanes independent rows at once, so the compiler vectorizes across
// rows and the latency of each column's divide/round chain is paid once per
// tile instead of once per row.
constexpr std::int64_t kGptqLanes = 16;

struct GptqTile {
  explicit GptqTile(std::int64_t B) : w(static_cast<std::size_t>(B * kGptqLanes)), e(w.size()), c(w.size()), gbuf(0) {}
  std::vector<float> w, e;
  std::vector<std::uint8_t> c;
  std::vector<float> gbuf;
};

inline void gptq_block_tile(const QuantSpec& spec, const GPTQ::config& cfg, const std::vector<std::int32_t>& perm,
                            const RowMatrix<float>& Hinv, std::int64_t i1, std::int64_t i2, std::int64_t r0,
                            std::int64_t nl, RowMatrix<float>& W, RowMatrix<std::uint8_t>& codes,
                            RowMatrix<float>& Err, QuantResult& res, std::vector<double>& row_loss, GptqTile& tile) {
  constexpr std::int64_t L = kGptqLanes;
  const std::int64_t n = W.cols(), count = i2 - i1, gs = spec.group_size;
  const int maxq = spec.maxq();
  float* T = tile.w.data();
  float* E = tile.e.data();
  std::uint8_t* C = tile.c.data();
  // Transpose the rows' block into the tile; unused lanes of a partial tile hold 0.
  // Row-wise: contiguous reads of W, writes into the L1-resident tile.
  for (std::int64_t l = 0; l < L; ++l) {
    const float* w = W.data() + (r0 + std::min(l, nl - 1)) * W.cols() + i1;
    for (std::int64_t k = 0; k < count; ++k) T[k * L + l] = l < nl ? w[k] : 0.f;
  }
  float scale[L], zero[L], loss[L] = {};
  for (std::int64_t l = 0; l < L; ++l) {
    scale[l] = 1.f;
    zero[l] = 0.f;
  }
  std::int64_t loaded_group = -1;
  for (std::int64_t i = 0; i < count; ++i) {
    const std::int64_t col = i1 + i;
    const std::int64_t g = gptq_group(spec, cfg, perm, col);
    if (spec.grouped() && !cfg.static_groups && col % gs == 0) {
      // New group: parameters from the current (error-updated) weights. Columns
      // past this block are up to date too: effective_blocksize() makes a group
      // that leaves the block start at the block's first column.
      const std::int64_t width = spec.group_width(g, n);
      tile.gbuf.resize(static_cast<std::size_t>(width));
      for (std::int64_t l = 0; l < nl; ++l) {
        for (std::int64_t k = 0; k < width; ++k)
          tile.gbuf[k] = col + k < i2 ? T[(i + k) * L + l] : W(r0 + l, col + k);
        const QuantParams p = find_params(tile.gbuf.data(), width, 1, spec);
        res.scales(r0 + l, g) = p.scale;
        res.zeros(r0 + l, g) = p.zero;
      }
      loaded_group = -1;
    }
    if (g != loaded_group) {
      for (std::int64_t l = 0; l < nl; ++l) {
        scale[l] = res.scales(r0 + l, g);
        zero[l] = res.zeros(r0 + l, g);
      }
      loaded_group = g;
    }
    const float d = Hinv(col, col);
    float* x = T + i * L;
    float* e = E + i * L;
    std::uint8_t* c = C + i * L;
    for (std::int64_t l = 0; l < L; ++l) {
      const float qc = quantize_code(x[l], QuantParams{scale[l], zero[l]}, maxq);
      const float q = dequantize_code(qc, QuantParams{scale[l], zero[l]});
      const float err = (x[l] - q) / d;
      c[l] = static_cast<std::uint8_t>(qc);
      x[l] = q;  // column col is final: keep Q in place of W
      e[l] = err;
      loss[l] += err * err;
    }
    const float* h = Hinv.data() + col * n + i1;
    for (std::int64_t k = i + 1; k < count; ++k) {
      const float hk = h[k];
      float* y = T + k * L;
      for (std::int64_t l = 0; l < L; ++l) y[l] -= e[l] * hk;
    }
  }
  for (std::int64_t l = 0; l < nl; ++l) {
    float* w = W.data() + (r0 + l) * n + i1;
    std::uint8_t* code = codes.data() + (r0 + l) * n + i1;
    float* err = Err.data() + (r0 + l) * Err.cols();
    for (std::int64_t k = 0; k < count; ++k) {
      w[k] = T[k * L + l];
      code[k] = C[k * L + l];
      err[k] = E[k * L + l];
    }
    row_loss[r0 + l] += static_cast<double>(loss[l]) / 2.0;
  }
}

inline QuantResult quantize_impl(GPTQ, const QuantSpec& spec, const GPTQ::config& cfg, const TensorView& Wv,
                                 const TensorView& Hv) {
  if (on_cuda(Wv) || (Hv.data() && on_cuda(Hv))) {
    require_same_device(Wv, "W", Hv, "H");
    return cuda_backend_for(Wv, "W").gptq(spec, cfg.blocksize, cfg.percdamp, cfg.act_order, cfg.static_groups,
                                          cfg.damp_retries, cfg.layer_name, Wv, Hv, cuda_stream_slot());
  }
  RowMatrix<float> W = load_weights(Wv, cfg.layer_name);
  const std::int64_t m = W.rows(), n = W.cols();
  spec.validate_for(n);
  RowMatrix<float> H = load_hessian(Hv, n, cfg.layer_name);
  const std::int64_t gs = spec.group_size;
  const int nt = num_threads();

  QuantResult res;
  init_result(res, spec, m, n, GPTQ::name);

  // Per-channel parameters come from the weights before dead columns are
  // zeroed, as in the reference (find_params runs before fasterquant's body).
  if (!spec.grouped()) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (std::int64_t r = 0; r < m; ++r) {
      const QuantParams p = find_params(W.data() + r * n, n, 1, spec);
      res.scales(r, 0) = p.scale;
      res.zeros(r, 0) = p.zero;
    }
  }

  // Dead inputs (never active in calibration): H_ii = 1, W[:, i] = 0.
  for (std::int64_t i = 0; i < n; ++i) {
    if (H(i, i) == 0.f) {
      H(i, i) = 1.f;
      W.col(i).setZero();
    }
  }

  if (spec.grouped() && cfg.static_groups) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (std::int64_t r = 0; r < m; ++r)
      for (std::int64_t g = 0; g < spec.num_groups(n); ++g) {
        const QuantParams p = find_params(W.data() + r * n + g * gs, spec.group_width(g, n), 1, spec);
        res.scales(r, g) = p.scale;
        res.zeros(r, g) = p.zero;
      }
  }

  std::vector<std::int32_t> perm(static_cast<std::size_t>(n));
  std::iota(perm.begin(), perm.end(), 0);
  if (cfg.act_order) {
    std::stable_sort(perm.begin(), perm.end(), [&](std::int32_t a, std::int32_t b) { return H(a, a) > H(b, b); });
    RowMatrix<float> Wp(m, n);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (std::int64_t r = 0; r < m; ++r)
      for (std::int64_t i = 0; i < n; ++i) Wp(r, i) = W(r, perm[i]);
    W.swap(Wp);
  }

  // Damped inverse factor, retrying with more damping when H is not positive
  // definite (too few calibration tokens, duplicate or collinear inputs).
  RowMatrix<float> Hinv;
  const double mean_diag = H.diagonal().cast<double>().mean();
  // Each retry multiplies the damping by 10 (starting from 0.01 when it was 0).
  auto more_damping = [](double pd) { return pd > 0.0 ? pd * 10.0 : 0.01; };
  double percdamp = cfg.percdamp;
  int info = 0;
  for (int attempt = 0;; ++attempt) {
    info = hinv_upper(H, perm, static_cast<float>(percdamp * mean_diag), Hinv);
    if (info == 0 || attempt == cfg.damp_retries) break;
    warn("layer '{}': Hessian is not positive definite with percdamp={} (leading minor {} fails); retrying with "
         "percdamp={}",
         layer_label(cfg.layer_name), percdamp, info, more_damping(percdamp));
    percdamp = more_damping(percdamp);
  }
  if (info != 0) {
    warn("layer '{}': Hessian is not positive definite even with percdamp={}; quantizing this layer with RTN "
         "instead. Calibrate with more tokens (nsamples/seqlen) or raise percdamp",
         layer_label(cfg.layer_name), percdamp);
    QuantResult rtn = quantize_impl(RTN{}, spec, RTN::config{cfg.layer_name}, Wv, TensorView());
    rtn.fell_back_to_rtn = true;
    return rtn;
  }
  res.percdamp = percdamp;
  H.resize(0, 0);

  const std::int64_t B = effective_blocksize(spec, cfg);
  RowMatrix<float> Err(m, B);
  RowMatrix<std::uint8_t> codes_p(m, n);
  std::vector<double> row_loss(static_cast<std::size_t>(m), 0.0);

  for (std::int64_t i1 = 0; i1 < n; i1 += B) {
    const std::int64_t i2 = std::min(i1 + B, n);
    const std::int64_t tiles = (m + kGptqLanes - 1) / kGptqLanes;
#pragma omp parallel num_threads(nt)
    {
      GptqTile tile(B);
#pragma omp for schedule(static)
      for (std::int64_t t = 0; t < tiles; ++t)
        gptq_block_tile(spec, cfg, perm, Hinv, i1, i2, t * kGptqLanes, std::min<std::int64_t>(kGptqLanes, m - t * kGptqLanes),
                        W, codes_p, Err, res, row_loss, tile);
    }
    // Lazy batch update of all later columns: W[:, i2:] -= Err * Hinv[i1:i2, i2:].
    if (i2 < n)
      gemm_sub(static_cast<int>(m), static_cast<int>(n - i2), static_cast<int>(i2 - i1), Err.data(),
               static_cast<int>(B), Hinv.data() + i1 * n + i2, static_cast<int>(n), W.data() + i2,
               static_cast<int>(n));
  }
  res.loss = std::accumulate(row_loss.begin(), row_loss.end(), 0.0);

  for (std::int64_t i = 0; i < n; ++i) res.g_idx[perm[i]] = static_cast<std::int32_t>(gptq_group(spec, cfg, perm, i));
  if (cfg.act_order) {
    res.Q.resize(m, n);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (std::int64_t r = 0; r < m; ++r)
      for (std::int64_t i = 0; i < n; ++i) {
        res.Q(r, perm[i]) = W(r, i);
        res.codes(r, perm[i]) = codes_p(r, i);
      }
    res.perm = std::move(perm);
  } else {
    res.Q.swap(W);
    res.codes.swap(codes_p);
  }
  return res;
}

}  // namespace detail

template <class Method>
QuantResult Quantizer<Method>::quantize(const TensorView& W, const TensorView& H) const {
  return detail::quantize_impl(Method{}, spec_, cfg_, W, H);
}

}  // namespace normtweak
