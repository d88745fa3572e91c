// Quantizer<Method>: weight quantizers as policies. Method is a tag type
// (RTN, GPTQ, SmoothQuant; see rtn.h, gptq.h, smoothquant.h) carrying its own `config`.
//
//   normtweak::Quantizer<normtweak::GPTQ> q(spec, {.blocksize = 128, .act_order = true});
//   normtweak::QuantResult r = q.quantize(W, H);
//
// W: [out_features, in_features], float32/float64/float16/bfloat16, CPU, any
//    strides (it is copied into a float32 working buffer).
// H: [in_features, in_features] float32 or float64 (GPTQ; RTN ignores it);
//    for SmoothQuant, the smoothing factors s [in_features] float32.
#pragma once

#include "normtweak/config.h"
#include "normtweak/quant_spec.h"
#include "normtweak/tensor_view.h"

#include <Eigen/Core>

#include <cstdint>
#include <string>
#include <vector>

namespace normtweak {

template <typename T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

struct QuantResult {
  RowMatrix<float> Q;              // [out, in] dequantized weights, float32, original column order
  RowMatrix<std::uint8_t> codes;   // [out, in] integer codes in [0, maxq]
  RowMatrix<float> scales;         // [out, ngroups]
  RowMatrix<float> zeros;          // [out, ngroups], integer-valued zero points
  std::vector<std::int32_t> g_idx; // [in] group index of each input column
  std::vector<std::int32_t> perm;  // [in] act-order column order (empty without act-order)
  double loss = 0.0;               // GPTQ: sum (w - q)^2 / Hinv_ii^2 / 2, as the reference reports; RTN: sum (w - q)^2
  double percdamp = 0.0;           // damping actually used (GPTQ; after retries)
  bool fell_back_to_rtn = false;   // GPTQ could not factor H and used RTN instead
  std::string method;              // "rtn", "gptq" or "smoothquant"
  std::vector<float> smooth;       // [in] SmoothQuant factors s: Q approximates W diag(s) (empty otherwise)
};

template <class Method>
class Quantizer {
 public:
  using config = typename Method::config;

  explicit Quantizer(QuantSpec spec, config cfg = {}) : spec_(spec), cfg_(std::move(cfg)) {
    spec_.validate();
    Method::validate(cfg_);
  }

  QuantResult quantize(const TensorView& W, const TensorView& H = TensorView()) const;

  const QuantSpec& spec() const { return spec_; }
  const config& cfg() const { return cfg_; }

 private:
  QuantSpec spec_;
  config cfg_;
};

}  // namespace normtweak
