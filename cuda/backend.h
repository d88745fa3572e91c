// normtweak::cuda: the CUDA back-end. Every function takes tensors on one CUDA
// device and a stream (a cudaStream_t; nullptr is the legacy default stream)
// and queues its work there. Results that the CPU API returns by value
// (QuantResult, the loss) are copied back to the host, which synchronizes the
// stream; everything else stays asynchronous.
//
// register_backend() makes the core's entry points (Quantizer<RTN|GPTQ>,
// norm_forward, norm_backward, channel_dist_loss) dispatch CUDA tensors here; the CMake
// target normtweak::cuda runs it at start-up in every program that links it.
#pragma once

#include "normtweak/channel_dist_loss.h"
#include "normtweak/gptq.h"
#include "normtweak/norm.h"
#include "normtweak/rtn.h"

namespace normtweak::cuda {

QuantResult rtn_quantize(const QuantSpec& spec, const std::string& layer, const TensorView& W, void* stream);

QuantResult gptq_quantize(const QuantSpec& spec, const GPTQ::config& cfg, const TensorView& W, const TensorView& H,
                          void* stream);

void norm_forward(const NormSpec& spec, const TensorView& x, const TensorView& w, const TensorView* b,
                  const TensorView& y, const TensorView& rstd, const TensorView* mean, void* stream);

void norm_backward(const NormSpec& spec, const TensorView& x, const TensorView& w, const TensorView& dy,
                   const TensorView& rstd, const TensorView* mean, const TensorView& dx, const TensorView& dw,
                   const TensorView* db, void* stream);

double channel_dist_loss(const TensorView& f, const TensorView& q, DistLoss kind, const TensorView* grad_q,
                         void* stream);

// The streaming GPTQ Hessian H = 2/n sum_t x_t x_t^T on the GPU, float32
// accumulation: a cuBLAS SYRK for float32 inputs, GemmEx with float32 compute
// for float16/bfloat16 inputs; H <- H * n_old / n_new + 2 / n_new X^T X.
class HessianAccumulator {
 public:
  HessianAccumulator(std::int64_t columns, int device);
  ~HessianAccumulator();
  HessianAccumulator(const HessianAccumulator&) = delete;
  HessianAccumulator& operator=(const HessianAccumulator&) = delete;

  // X [..., columns] on this accumulator's device, rows contiguous.
  void add_batch(const TensorView& X, void* stream);
  // H [columns, columns] float32 on the device (full symmetric), valid after the stream's work.
  TensorView view(void* stream);
  std::int64_t nsamples() const { return nsamples_; }

 private:
  std::int64_t n_;
  int device_;
  std::int64_t nsamples_ = 0;
  float* H_ = nullptr;
  void* handle_ = nullptr;  // cublasHandle_t
  bool symmetric_ = true;
};

// Fill the core's dispatch table (idempotent).
void register_backend();

}  // namespace normtweak::cuda
