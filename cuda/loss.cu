// The Norm Tweaking loss and its gradient on the GPU; bodies in loss_kernel.h.
#include "loss_kernel.h"

#include <cuda_runtime.h>

namespace normtweak::cuda {

namespace {

unsigned blocks_for(std::int64_t n) {
  const std::int64_t b = (n + kLossThreads - 1) / kLossThreads;
  return static_cast<unsigned>(b < 65535 ? (b > 0 ? b : 1) : 65535);
}

__global__ void dist_channel_kernel(DistLossParams p) {
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < p.C) dist_loss_channel(p, c);
}

__global__ void dist_grad_kernel(DistLossParams p) {
  const std::int64_t n = p.T * p.C, step = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step)
    dist_loss_grad(p, i);
}

__global__ void mse_kernel(MseLossParams p) {
  const std::int64_t step = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += step)
    mse_loss_element(p, i);
}

__global__ void kl_kernel(KlLossParams p) {
  const std::int64_t t = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < p.T) kl_loss_row(p, t);
}

}  // namespace

int launch_dist_loss(const DistLossParams& p, void* stream) {
  if (p.T == 0 || p.C == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  dist_channel_kernel<<<static_cast<unsigned>((p.C + kLossThreads - 1) / kLossThreads), kLossThreads, 0, s>>>(p);
  if (p.grad) dist_grad_kernel<<<blocks_for(p.T * p.C), kLossThreads, 0, s>>>(p);
  return static_cast<int>(cudaGetLastError());
}

int launch_mse_loss(const MseLossParams& p, void* stream) {
  if (p.n == 0) return 0;
  mse_kernel<<<blocks_for(p.n), kLossThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return static_cast<int>(cudaGetLastError());
}

int launch_kl_loss(const KlLossParams& p, void* stream) {
  if (p.T == 0) return 0;
  kl_kernel<<<static_cast<unsigned>((p.T + kLossThreads - 1) / kLossThreads), kLossThreads, 0,
              static_cast<cudaStream_t>(stream)>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace normtweak::cuda
