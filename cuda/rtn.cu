// RTN quantize/dequantize on the GPU; the body is rtn_thread() from rtn_kernel.h.
#include "rtn_kernel.h"

#include <cuda_runtime.h>

namespace normtweak::cuda {

__global__ void rtn_kernel(RtnParams p) {
  rtn_thread(p, blockIdx.x, threadIdx.x, blockDim.x, gridDim.x);
}

int launch_rtn(const RtnParams& p, void* stream) {
  if (p.rows == 0 || p.cols == 0) return 0;
  rtn_kernel<<<static_cast<unsigned>(rtn_grid(p)), kRtnBlock, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace normtweak::cuda
