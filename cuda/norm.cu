// LayerNorm/RMSNorm backward on the GPU; the bodies are in norm_kernel.h.
#include "norm_kernel.h"
#include "reduce.cuh"

#include <cuda_runtime.h>

namespace normtweak::cuda {

__global__ void norm_fwd_row_kernel(NormFwdParams p) {
  __shared__ double partial[kNormRowThreads / 32];
  __shared__ double total;
  const std::int64_t t = blockIdx.x;
  double mu = 0.0;
  if (p.layer) mu = block_sum(norm_fwd_row_sum(p, t, threadIdx.x, blockDim.x), partial, &total) / static_cast<double>(p.C);
  const double ss = block_sum(norm_fwd_row_sq(p, t, threadIdx.x, blockDim.x, mu), partial, &total);
  norm_fwd_row_write(p, t, threadIdx.x, blockDim.x, mu, ss);
}

__global__ void norm_bwd_row_kernel(NormBwdParams p) {
  __shared__ RowSums partial[kNormRowThreads / 32];
  __shared__ RowSums total;
  const std::int64_t t = blockIdx.x;
  RowSums s = norm_bwd_row_partial(p, t, threadIdx.x, blockDim.x);
  s = block_sum(s, partial, &total);
  norm_bwd_row_dx(p, t, threadIdx.x, blockDim.x, s);
}

__global__ void norm_bwd_param_kernel(NormBwdParams p) {
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < p.C) norm_bwd_param_column(p, c);
}

int launch_norm_forward(const NormFwdParams& p, void* stream) {
  if (p.T == 0 || p.C == 0) return 0;
  norm_fwd_row_kernel<<<static_cast<unsigned>(p.T), kNormRowThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return static_cast<int>(cudaGetLastError());
}

int launch_norm_backward(const NormBwdParams& p, void* stream) {
  if (p.T == 0 || p.C == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  // One block per row: T <= 2^31 - 1 rows (a grid's x limit).
  norm_bwd_row_kernel<<<static_cast<unsigned>(p.T), kNormRowThreads, 0, s>>>(p);
  const auto cols = static_cast<unsigned>((p.C + kNormColThreads - 1) / kNormColThreads);
  norm_bwd_param_kernel<<<cols, kNormColThreads, 0, s>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace normtweak::cuda
