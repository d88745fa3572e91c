// Device dispatch: the core's entry points (Quantizer<RTN|GPTQ>::quantize,
// norm_forward, norm_backward, channel_dist_loss) take the CUDA path when their tensors live
// on a CUDA device. The core never depends on CUDA: the normtweak::cuda target
// fills this table (normtweak::cuda::register_backend(), which its CMake
// target runs at start-up in every program that links it). Without it, a CUDA
// tensor is a clear error.
//
// Work is queued on the caller's stream: set it for a scope with CudaStreamScope
// (the Python bindings pass PyTorch's current stream).
#pragma once

#include "normtweak/error.h"
#include "normtweak/tensor_view.h"

#include <string>

namespace normtweak {

struct QuantSpec;
struct QuantResult;
struct NormSpec;
enum class DistLoss;

struct CudaBackend {
  QuantResult (*rtn)(const QuantSpec&, const std::string& layer, const TensorView& W, void* stream);
  QuantResult (*gptq)(const QuantSpec&, int blocksize, double percdamp, bool act_order, bool static_groups,
                      int damp_retries, const std::string& layer, const TensorView& W, const TensorView& H,
                      void* stream);
  void (*norm_forward)(const NormSpec&, const TensorView& x, const TensorView& w, const TensorView* b,
                       const TensorView& y, const TensorView& rstd, const TensorView* mean, void* stream);
  void (*norm_backward)(const NormSpec&, const TensorView& x, const TensorView& w, const TensorView& dy,
                        const TensorView& rstd, const TensorView* mean, const TensorView& dx, const TensorView& dw,
                        const TensorView* db, void* stream);
  double (*channel_dist_loss)(const TensorView& f, const TensorView& q, DistLoss kind, const TensorView* grad_q,
                              void* stream);
};

inline const CudaBackend*& cuda_backend_slot() {
  static const CudaBackend* slot = nullptr;
  return slot;
}

inline void*& cuda_stream_slot() {
  thread_local void* stream = nullptr;  // nullptr: the legacy default stream
  return stream;
}

// Queue this thread's CUDA work on `stream` (a cudaStream_t) until the scope ends.
class CudaStreamScope {
 public:
  explicit CudaStreamScope(void* stream) : saved_(cuda_stream_slot()) { cuda_stream_slot() = stream; }
  ~CudaStreamScope() { cuda_stream_slot() = saved_; }
  CudaStreamScope(const CudaStreamScope&) = delete;
  CudaStreamScope& operator=(const CudaStreamScope&) = delete;

 private:
  void* saved_;
};

inline bool on_cuda(const TensorView& t) { return t.dev().kind == device_kind::cuda; }

// The backend for a tensor on a CUDA device, or an error that says how to get one.
inline const CudaBackend& cuda_backend_for(const TensorView& t, const char* name) {
  const CudaBackend* b = cuda_backend_slot();
  NT_CHECK(b != nullptr,
           "{} is on {}, but this build of normtweak has no CUDA back-end; link normtweak::cuda (CMake option "
           "NORMTWEAK_CUDA=ON) or move the tensor to the CPU",
           name, t.dev().str());
  return *b;
}

}  // namespace normtweak
