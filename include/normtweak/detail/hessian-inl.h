// Body of HessianAccumulator<Acc>.
#pragma once

#include "normtweak/detail/convert.h"
#include "normtweak/detail/linalg.h"
#include "normtweak/hessian.h"

#include <algorithm>

namespace normtweak {

template <typename Acc>
HessianAccumulator<Acc>::HessianAccumulator(std::int64_t columns) : n_(columns) {
  NT_CHECK(columns > 0, "HessianAccumulator needs columns > 0, got {}", columns);
  H_ = RowMatrix<Acc>::Zero(columns, columns);
}

template <typename Acc>
void HessianAccumulator<Acc>::add_batch(const TensorView& Xin) {
  require_cpu(Xin, "X");
  require_floating(Xin, "X");
  NT_CHECK(Xin.rank() >= 1 && Xin.size(-1) == n_,
           "X has shape {} but the layer has in_features={}; pass activations of shape [..., {}]", Xin.shape_str(),
           n_, n_);
  const TensorView X = Xin.flatten_2d("X");
  const std::int64_t t = X.size(0);
  if (t == 0) return;
  // Direct use of the caller's buffer when it already is Acc with unit inner
  // stride; otherwise convert in chunks of at most ~16M elements.
  const bool direct = X.type() == dtype_of<Acc>::value && (X.stride(1) == 1 || n_ == 1);
  const std::int64_t chunk = direct ? t : std::max<std::int64_t>(1, std::min<std::int64_t>(t, (1 << 24) / n_));
  for (std::int64_t r0 = 0; r0 < t; r0 += chunk) {
    const std::int64_t rows = std::min(chunk, t - r0);
    const Acc* x;
    std::int64_t ld;
    if (direct) {
      x = X.data_as<const Acc>() + r0 * X.stride(0);
      ld = rows > 1 ? X.stride(0) : n_;
      std::int64_t bad = 0;
      for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t c = 0; c < n_; ++c) bad += !std::isfinite(x[r * X.stride(0) + c]);
      NT_CHECK(bad == 0, "calibration activations X contain {} NaN/Inf values (batch of {} tokens); the model "
               "produces non-finite activations on this input", bad, t);
    } else {
      if (buf_.rows() < rows) buf_.resize(rows, n_);
      const std::int64_t bad = detail::copy_rows<Acc>(X, r0, rows, buf_.data());
      NT_CHECK(bad == 0, "calibration activations X contain {} NaN/Inf values (batch of {} tokens); the model "
               "produces non-finite activations on this input", bad, t);
      x = buf_.data();
      ld = n_;
    }
    const std::int64_t total = nsamples_ + rows;
    const Acc beta = static_cast<Acc>(static_cast<double>(nsamples_) / static_cast<double>(total));
    const Acc alpha = static_cast<Acc>(2.0 / static_cast<double>(total));
    detail::syrk_lower<Acc>(static_cast<int>(n_), static_cast<int>(rows), alpha, x, static_cast<int>(std::max<std::int64_t>(ld, 1)),
                            beta, H_.data(), static_cast<int>(n_));
    nsamples_ = total;
    symmetric_ = false;
  }
}

template <typename Acc>
const RowMatrix<Acc>& HessianAccumulator<Acc>::hessian() {
  if (!symmetric_) {
    H_.template triangularView<Eigen::StrictlyUpper>() = H_.transpose();
    symmetric_ = true;
  }
  return H_;
}

template <typename Acc>
TensorView HessianAccumulator<Acc>::view() {
  hessian();
  return TensorView::of(H_.data(), {n_, n_});
}

template <typename Acc>
void HessianAccumulator<Acc>::reset() {
  H_.setZero();
  nsamples_ = 0;
  symmetric_ = true;
}

}  // namespace normtweak
