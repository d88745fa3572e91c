// GPTQ packing on the GPU; the bodies are in pack_kernel.h.
#include "pack_kernel.h"

#include <cuda_runtime.h>

namespace normtweak::cuda {

namespace {

__global__ void qweight_kernel(PackParams p) {
  const std::int64_t words = p.in * p.bits / 32, n = words * p.out;
  const std::int64_t step = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step)
    pack_qweight_word(p, i / p.out, i % p.out);
}

__global__ void qzeros_kernel(PackParams p) {
  const std::int64_t words = p.out * p.bits / 32, n = words * p.G;
  const std::int64_t step = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step)
    pack_qzeros_word(p, i / words, i % words);
}

unsigned blocks_for(std::int64_t n) {
  const std::int64_t b = (n + kPackThreads - 1) / kPackThreads;
  return static_cast<unsigned>(b < 65535 ? (b > 0 ? b : 1) : 65535);
}

}  // namespace

int launch_pack_gptq(const PackParams& p, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (p.in * p.out > 0) qweight_kernel<<<blocks_for(p.in * p.bits / 32 * p.out), kPackThreads, 0, s>>>(p);
  if (p.G * p.out > 0) qzeros_kernel<<<blocks_for(p.out * p.bits / 32 * p.G), kPackThreads, 0, s>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace normtweak::cuda
