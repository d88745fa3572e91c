// RTN quantize/dequantize kernel: every weight of W [rows, cols] snapped to the
// grid of its group, given per-(row, group) scales and zeros and g_idx.
//
// The arithmetic lives in __host__ __device__ functions (rtn_element,
// rtn_thread) so the CPU tests drive the exact kernel body over every block and
// thread of a launch; launch_rtn() runs it on the GPU.
#pragma once

#include "normtweak/config.h"
#include "normtweak/detail/quant_math.h"

#include <cstdint>

namespace normtweak::cuda {

struct RtnParams {
  const float* W;              // [rows, cols], row stride w_row_stride (elements)
  float* Q;                    // [rows, cols] contiguous: dequantized output
  std::uint8_t* codes;         // [rows, cols] contiguous: integer codes
  const float* scales;         // [rows, ngroups] contiguous
  const float* zeros;          // [rows, ngroups] contiguous
  const std::int32_t* g_idx;   // [cols]
  std::int64_t rows, cols, w_row_stride;
  std::int32_t ngroups, maxq;
};

NT_HOST_DEVICE inline void rtn_element(const RtnParams& p, std::int64_t r, std::int64_t c) {
  const std::int64_t g = p.g_idx[c];
  const QuantParams qp{p.scales[r * p.ngroups + g], p.zeros[r * p.ngroups + g]};
  const float code = quantize_code(p.W[r * p.w_row_stride + c], qp, p.maxq);
  p.codes[r * p.cols + c] = static_cast<std::uint8_t>(code);
  p.Q[r * p.cols + c] = dequantize_code(code, qp);
}

// One thread's share of a 1-D grid-stride launch over rows * cols elements.
NT_HOST_DEVICE inline void rtn_thread(const RtnParams& p, std::int64_t block, std::int64_t thread,
                                      std::int64_t block_dim, std::int64_t grid_dim) {
  const std::int64_t total = p.rows * p.cols;
  for (std::int64_t i = block * block_dim + thread; i < total; i += block_dim * grid_dim)
    rtn_element(p, i / p.cols, i % p.cols);
}

constexpr int kRtnBlock = 256;

inline std::int64_t rtn_grid(const RtnParams& p) {
  const std::int64_t blocks = (p.rows * p.cols + kRtnBlock - 1) / kRtnBlock;
  return blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535;
}

// Launch on `stream` (a cudaStream_t). Returns the CUDA error code (0 = success).
int launch_rtn(const RtnParams& p, void* stream);

}  // namespace normtweak::cuda
