// GPTQ's per-row kernels; the bodies are in gptq_kernel.h.
#include "gptq_kernel.h"

#include <cuda_runtime.h>

namespace normtweak::cuda {

namespace {

__global__ void row_params_kernel(GptqBlockParams p) {
  const std::int64_t r = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r < p.m) gptq_row_params(p, r);
}

__global__ void block_kernel(GptqBlockParams p) {
  const std::int64_t r = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r < p.m) gptq_block_row(p, r);
}

__global__ void static_params_kernel(GptqBlockParams p) {
  const std::int64_t r = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r < p.m) gptq_static_params(p, r);
}

// 2-D grid-stride loops over [rows, cols] element kernels.
template <typename F>
__device__ void for_each_element(std::int64_t rows, std::int64_t cols, F f) {
  const std::int64_t n = rows * cols, step = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t k = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < n; k += step)
    f(k / cols, k % cols);
}

__global__ void permute_kernel(const float* src, float* dst, const std::int32_t* perm, std::int64_t m,
                               std::int64_t n) {
  for_each_element(m, n, [&](std::int64_t r, std::int64_t i) { permute_columns_element(src, dst, perm, n, r, i); });
}

__global__ void gather_kernel(const float* H, float* A, const std::int32_t* order, float damp, std::int64_t n) {
  for_each_element(n, n, [&](std::int64_t i, std::int64_t j) { hinv_gather_element(H, A, order, damp, n, i, j); });
}

__global__ void finish_kernel(const float* L, float* U, std::int64_t n) {
  for_each_element(n, n, [&](std::int64_t a, std::int64_t b) { hinv_finish_element(L, U, n, a, b); });
}

__global__ void mirror_kernel(float* H, std::int64_t n) {
  for_each_element(n, n, [&](std::int64_t i, std::int64_t j) { mirror_upper_element(H, n, i, j); });
}

unsigned element_blocks(std::int64_t n) {
  const std::int64_t b = (n + 255) / 256;
  return static_cast<unsigned>(b < 65535 ? (b > 0 ? b : 1) : 65535);
}

unsigned row_blocks(std::int64_t m) { return static_cast<unsigned>((m + kGptqThreads - 1) / kGptqThreads); }

}  // namespace

int launch_gptq_row_params(const GptqBlockParams& p, void* stream) {
  if (p.m == 0) return 0;
  row_params_kernel<<<row_blocks(p.m), kGptqThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return static_cast<int>(cudaGetLastError());
}

int launch_gptq_block(const GptqBlockParams& p, void* stream) {
  if (p.m == 0 || p.i2 <= p.i1) return 0;
  block_kernel<<<row_blocks(p.m), kGptqThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return static_cast<int>(cudaGetLastError());
}

int launch_gptq_static_params(const GptqBlockParams& p, void* stream) {
  if (p.m == 0) return 0;
  static_params_kernel<<<row_blocks(p.m), kGptqThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return static_cast<int>(cudaGetLastError());
}

int launch_permute_columns(const float* src, float* dst, const std::int32_t* perm, std::int64_t m, std::int64_t n,
                           void* stream) {
  if (m * n == 0) return 0;
  permute_kernel<<<element_blocks(m * n), 256, 0, static_cast<cudaStream_t>(stream)>>>(src, dst, perm, m, n);
  return static_cast<int>(cudaGetLastError());
}

int launch_hinv_gather(const float* H, float* A, const std::int32_t* order, float damp, std::int64_t n, void* stream) {
  if (n == 0) return 0;
  gather_kernel<<<element_blocks(n * n), 256, 0, static_cast<cudaStream_t>(stream)>>>(H, A, order, damp, n);
  return static_cast<int>(cudaGetLastError());
}

int launch_hinv_finish(const float* Linv_colmajor, float* U, std::int64_t n, void* stream) {
  if (n == 0) return 0;
  finish_kernel<<<element_blocks(n * n), 256, 0, static_cast<cudaStream_t>(stream)>>>(Linv_colmajor, U, n);
  return static_cast<int>(cudaGetLastError());
}

int launch_mirror_upper(float* H, std::int64_t n, void* stream) {
  if (n == 0) return 0;
  mirror_kernel<<<element_blocks(n * n), 256, 0, static_cast<cudaStream_t>(stream)>>>(H, n);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace normtweak::cuda
