// HessianAccumulator: the layer-wise GPTQ Hessian H = 2/n * sum_t x_t x_t^T
// over the n calibration tokens a Linear layer sees, accumulated in a stream of
// batches with the reference's running rescale
//   H <- H * n_old / n_new + 2/n_new * X^T X
// as one symmetric rank-k update (only the lower triangle: half a GEMM's flops).
//
// Unlike the reference, which counts sequences, n counts tokens (rows of X);
// this only rescales H, which GPTQ's relative damping makes irrelevant.
//
// Acc (float or double) is the accumulation type.
#pragma once

#include "normtweak/config.h"
#include "normtweak/quantizer.h"
#include "normtweak/tensor_view.h"

#include <cstdint>

namespace normtweak {

template <typename Acc>
class HessianAccumulator {
  static_assert(std::is_same_v<Acc, float> || std::is_same_v<Acc, double>, "Acc must be float or double");

 public:
  explicit HessianAccumulator(std::int64_t columns);

  // X: [..., columns] activations entering the layer, float32/float64/
  // float16/bfloat16 on the CPU, contiguous in the last dimension. NaN/Inf is
  // an error that names the count.
  void add_batch(const TensorView& X);

  std::int64_t columns() const { return n_; }
  std::int64_t nsamples() const { return nsamples_; }

  // The full symmetric H [columns, columns], row-major.
  const RowMatrix<Acc>& hessian();
  // A view of hessian(), for Quantizer<GPTQ>::quantize.
  TensorView view();

  void reset();

 private:
  std::int64_t n_;
  std::int64_t nsamples_ = 0;
  bool symmetric_ = true;  // upper triangle mirrors the lower one
  RowMatrix<Acc> H_;
  RowMatrix<Acc> buf_;  // conversion buffer for non-Acc or strided inputs
};

#if NORMTWEAK_EXTERN_TEMPLATE
extern template class HessianAccumulator<float>;
extern template class HessianAccumulator<double>;
#endif

}  // namespace normtweak

#if !NORMTWEAK_EXTERN_TEMPLATE
#include "normtweak/detail/hessian-inl.h"
#endif
