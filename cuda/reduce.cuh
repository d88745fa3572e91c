// Block-wide sums with warp shuffles (device only). T needs operator+ and a
// value-initialised zero; every thread of the block gets the total.
#pragma once

#include <cuda_runtime.h>

namespace normtweak::cuda {

template <typename T>
__device__ inline T warp_sum(T v);

template <>
__device__ inline double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

template <>
__device__ inline float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Structs of doubles (RowSums, ...): reduce member by member.
template <typename T>
__device__ inline T warp_sum(T v) {
  T out{};
  out.g = warp_sum(v.g);
  out.gx = warp_sum(v.gx);
  return out;
}

// partial: shared memory for blockDim.x / 32 values; total: one shared value.
template <typename T>
__device__ inline T block_sum(T v, T* partial, T* total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = (blockDim.x + 31) / 32;
  v = warp_sum(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < nwarps ? partial[lane] : T{};
    w = warp_sum(w);
    if (lane == 0) *total = w;
  }
  __syncthreads();
  return *total;
}

}  // namespace normtweak::cuda
