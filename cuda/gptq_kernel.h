// GPTQ's in-block column loop on the GPU. GPTQ's updates never mix rows: row r
// of the block only needs its own weights and the shared factor Hinv. So one
// thread owns one row and runs the loop of Quantizer<GPTQ> (gptq_block_tile in
// detail/quantizer-inl.h) for it: for each column of the block, (new group:
// parameters from the current weights,) quantize, error e = (w - q) / Hinv[c,c],
// update the block's later columns w[k] -= e * Hinv[c,k]. The errors go to Err
// for the lazy update of the columns right of the block, one cuBLAS GEMM
// W[:, i2:] -= Err @ Hinv[i1:i2, i2:] (launch_gptq_lazy_update).
#pragma once

#include "normtweak/config.h"
#include "normtweak/detail/quant_math.h"

#include <cstdint>

namespace normtweak::cuda {

struct GptqBlockParams {
  float* W;                   // [m, n] working weights in act-order column order; block columns become Q
  const float* Hinv;          // [n, n] upper Cholesky factor of H^-1 (same column order), row-major
  std::uint8_t* codes;        // [m, n]
  float* Err;                 // [m, ld_err]: (w - q) / d for columns i1..i2-1
  float* scales;              // [m, G]
  float* zeros;               // [m, G]
  const std::int32_t* perm;   // [n] working column -> original column (static groups)
  double* row_loss;           // [m], accumulated: sum over columns of e^2 / 2
  std::int64_t m, n, i1, i2, ld_err;
  std::int32_t group_size;    // -1: one group per row
  std::int32_t G;             // groups per row
  std::int32_t maxq;
  bool sym;
  bool static_groups;         // parameters fixed before GPTQ (scales/zeros already filled)
  ClipSearch clip;
};

NT_HOST_DEVICE inline std::int64_t gptq_group_of(const GptqBlockParams& p, std::int64_t col) {
  if (p.group_size < 0) return 0;
  return p.static_groups ? p.perm[col] / p.group_size : col / p.group_size;
}

NT_HOST_DEVICE inline void gptq_block_row(const GptqBlockParams& p, std::int64_t r) {
  float* w = p.W + r * p.n;
  float* err = p.Err + r * p.ld_err;
  std::uint8_t* code = p.codes + r * p.n;
  float loss = 0.f;
  for (std::int64_t col = p.i1; col < p.i2; ++col) {
    const std::int64_t g = gptq_group_of(p, col);
    if (p.group_size > 0 && !p.static_groups && col % p.group_size == 0) {
      // The group's columns past this block are up to date: a group that
      // leaves the block starts at the block's first column (effective_blocksize).
      const std::int64_t width = p.n - col < p.group_size ? p.n - col : p.group_size;
      const QuantParams qp = find_params_raw(w + col, width, 1, p.maxq, p.sym, p.clip);
      p.scales[r * p.G + g] = qp.scale;
      p.zeros[r * p.G + g] = qp.zero;
    }
    const QuantParams qp{p.scales[r * p.G + g], p.zeros[r * p.G + g]};
    const float d = p.Hinv[col * p.n + col];
    const float x = w[col];
    const float qc = quantize_code(x, qp, p.maxq);
    const float q = dequantize_code(qc, qp);
    const float e = (x - q) / d;
    code[col] = static_cast<std::uint8_t>(qc);
    w[col] = q;
    err[col - p.i1] = e;
    loss += e * e;
    const float* h = p.Hinv + col * p.n;
    for (std::int64_t k = col + 1; k < p.i2; ++k) w[k] -= e * h[k];
  }
  p.row_loss[r] += static_cast<double>(loss) / 2.0;
}

// Per-channel GPTQ (no groups): the row's parameters come from the whole
// original row before the loop, as on the CPU.
NT_HOST_DEVICE inline void gptq_row_params(const GptqBlockParams& p, std::int64_t r) {
  const QuantParams qp = find_params_raw(p.W + r * p.n, p.n, 1, p.maxq, p.sym, p.clip);
  p.scales[r * p.G] = qp.scale;
  p.zeros[r * p.G] = qp.zero;
}

// Group parameters of row r from the weights as they are (static groups, and
// RTN): every group g of the row, the last one possibly short.
NT_HOST_DEVICE inline void gptq_static_params(const GptqBlockParams& p, std::int64_t r) {
  for (std::int64_t g = 0; g < p.G; ++g) {
    const std::int64_t start = g * p.group_size, width = p.n - start < p.group_size ? p.n - start : p.group_size;
    const QuantParams qp = find_params_raw(p.W + r * p.n + start, width, 1, p.maxq, p.sym, p.clip);
    p.scales[r * p.G + g] = qp.scale;
    p.zeros[r * p.G + g] = qp.zero;
  }
}

// Act-order: working column i of row r takes original column perm[i].
NT_HOST_DEVICE inline void permute_columns_element(const float* src, float* dst, const std::int32_t* perm,
                                                   std::int64_t n, std::int64_t r, std::int64_t i) {
  dst[r * n + i] = src[r * n + perm[i]];
}

// The inverse factor U (U^T U = H^-1, upper) in two steps around cuSOLVER, as
// hinv_upper() computes it on the CPU: A = J P^T H P J + damp I (J reverses the
// order, P is act-order), then potrf (lower) and trtri (lower) give L^-1 of A in
// column-major storage, and U is L^-1 rotated by 180 degrees.
//
// Element (i, j) of A: H[order[n-1-i], order[n-1-j]], plus damp on the diagonal.
NT_HOST_DEVICE inline void hinv_gather_element(const float* H, float* A, const std::int32_t* order, float damp,
                                               std::int64_t n, std::int64_t i, std::int64_t j) {
  const float v = H[order[n - 1 - i] * n + order[n - 1 - j]];
  A[i * n + j] = i == j ? v + damp : v;
}

// Element (a, b) of U from Linv, the column-major buffer trtri left (lower
// triangle valid): U[a][b] = Linv[n-1-a][n-1-b], which column-major storage
// holds at [(n-1-b) * n + (n-1-a)]; zero below the diagonal.
NT_HOST_DEVICE inline void hinv_finish_element(const float* Linv_colmajor, float* U, std::int64_t n, std::int64_t a,
                                               std::int64_t b) {
  U[a * n + b] = b >= a ? Linv_colmajor[(n - 1 - b) * n + (n - 1 - a)] : 0.f;
}

// After a SYRK that filled the upper triangle (row-major) of H: copy it to the lower one.
NT_HOST_DEVICE inline void mirror_upper_element(float* H, std::int64_t n, std::int64_t i, std::int64_t j) {
  if (i > j) H[i * n + j] = H[j * n + i];
}

constexpr int kGptqThreads = 128;

// Kernels on `stream` (a cudaStream_t); each returns the CUDA error code.
int launch_gptq_row_params(const GptqBlockParams& p, void* stream);
int launch_gptq_block(const GptqBlockParams& p, void* stream);
int launch_gptq_static_params(const GptqBlockParams& p, void* stream);
int launch_permute_columns(const float* src, float* dst, const std::int32_t* perm, std::int64_t m, std::int64_t n,
                           void* stream);
int launch_hinv_gather(const float* H, float* A, const std::int32_t* order, float damp, std::int64_t n, void* stream);
int launch_hinv_finish(const float* Linv_colmajor, float* U, std::int64_t n, void* stream);
int launch_mirror_upper(float* H, std::int64_t n, void* stream);

}  // namespace normtweak::cuda
