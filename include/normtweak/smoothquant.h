// SmoothQuant (Xiao et al. 2023, arXiv 2211.10438): move the activations'
// outlier channels into the weights before quantizing both. With per-input-
// channel factors (paper eq. 4)
//   s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)
// a Linear y = X W^T equals (X diag(1/s)) (W diag(s))^T; the 1/s is folded into
// whatever produces X (the preceding norm's weight and bias, or the previous
// Linear's output rows), so the float model is unchanged and only the
// quantization sees flatter activations.
//
//   normtweak::ActAbsMax acts(in);                 // per-channel running max |x|
//   acts.add_batch(X);                             // [..., in], every calibration batch
//   auto s = normtweak::smooth_factors(acts.view(), {Wq, Wk, Wv}, 0.5f);
//   normtweak::QuantResult r = normtweak::Quantizer<normtweak::SmoothQuant>(spec).quantize(
//       Wq, normtweak::TensorView::of(s.data(), {in}));   // RTN on W diag(s); r.smooth == s
#pragma once

#include "normtweak/config.h"
#include "normtweak/error.h"
#include "normtweak/quantizer.h"
#include "normtweak/tensor_view.h"

#include <cstdint>
#include <string>
#include <vector>

namespace normtweak {

struct SmoothQuant {
  static constexpr const char* name = "smoothquant";
  struct config {
    std::string layer_name;  // used in messages only
  };
  static void validate(const config&) {}
};

// Running per-channel maximum of |x| over all tokens seen.
class ActAbsMax {
 public:
  explicit ActAbsMax(std::int64_t channels);

  // X: [..., channels] float32/float64/float16/bfloat16 on the CPU, any
  // strides whose leading dimensions flatten. NaN/Inf is an error.
  void add_batch(const TensorView& X);

  std::int64_t channels() const { return static_cast<std::int64_t>(absmax_.size()); }
  std::int64_t tokens() const { return tokens_; }
  const std::vector<float>& absmax() const { return absmax_; }
  TensorView view() const { return TensorView::of(absmax_.data(), {channels()}); }
  void reset();

 private:
  std::vector<float> absmax_;
  std::int64_t tokens_ = 0;
};

// s_j = max(a_j, eps)^alpha / max(w_j, eps)^(1 - alpha), with a = act_absmax
// [in] and w_j = max over the rows of every W in `weights` (each [out_k, in])
// of |W_kj|: the layers that share one input share its factors. alpha in
// [0, 1]; eps = 1e-5 keeps dead channels finite (their factor stays moderate).
std::vector<float> smooth_factors(const TensorView& act_absmax, const std::vector<TensorView>& weights,
                                  float alpha);

// Quantizer<SmoothQuant>::quantize(W, s): RTN on W diag(s); s [in] float32
// comes from smooth_factors (QuantResult::smooth keeps it).
template <>
QuantResult Quantizer<SmoothQuant>::quantize(const TensorView& W, const TensorView& s) const;

}  // namespace normtweak

#if !NORMTWEAK_EXTERN_TEMPLATE
#include "normtweak/detail/smoothquant-inl.h"
#endif
