// Named tolerances of the C++ tests, with the reason for each value.
#pragma once

namespace normtweak::test::tol {

// GPTQ (float32, lazy batches, BLAS) vs the double-precision column-by-column
// reference. The symmetric grid puts each group's largest-magnitude weight on
// an exact rounding tie (x / scale = -maxq / 2), and the two implementations
// see that weight with different last bits, so about half of those ties round
// the other way; the different error then propagates along the row. Measured on
// the seeded cases: at most 0.52% of codes differ, the loss differs by <= 2.1e-3
// relative (a short last group of 16 columns amplifies single flips), the dequantized weights by <= 2.7% (each flip is a whole grid step).
constexpr double gptq_code_mismatch = 1e-2;
constexpr double gptq_loss_rel = 5e-3;
constexpr double gptq_weight_rel = 5e-2;

// Hessian in float32 vs the double reference: each entry is a sum over
// thousands of products; float32 accumulation in the BLAS's blocked order stays
// within ~1e-6 relative in Frobenius norm. 1e-5 absorbs unlucky orders.
constexpr double hessian_f32_rel = 1e-5;
// float64 accumulation of the same (float-representable) inputs.
constexpr double hessian_f64_rel = 1e-12;

// RTN float32 vs the double reference: codes may flip only where x / scale lies
// within float rounding of a .5 boundary, which seeded realistic weights hit
// at a rate far below this.
constexpr double rtn_code_mismatch = 1e-4;

// "not worse": act-order's output error may exceed plain GPTQ's by at most this
// relative margin on inputs with outlier channels (it is usually clearly better).
constexpr double act_order_slack = 0.02;

// SmoothQuant factors: the maxima are exact in float32 and eq. 4 is evaluated
// in double, so only the final cast to float32 (2^-24 relative) remains.
constexpr double smooth_factors = 1e-6;
// X W^T through SmoothQuant at W8 per channel (activations unquantized): the
// 8-bit grid's error, ~0.3% relative on these inputs; 1e-2 leaves room.
constexpr double smoothquant_w8_output = 1e-2;

// CUDA kernel bodies run on the CPU vs the CPU path. Norm backward and the
// loss gradient: the same float formulas, with the row sums reduced in the
// kernel's order (warps of 32) instead of sequentially: ~1e-7 relative
// measured; 1e-5 leaves room for the float casts of the double sums.
constexpr double cuda_norm_rel = 1e-5;
// The loss itself is a sum of double terms in both: only the summation order differs.
constexpr double cuda_loss_rel = 1e-9;
// On a GPU, exp/log and the float inputs' reductions differ from the host's
// libm in the last bits of each double term: 1e-6 relative.
constexpr double cuda_device_loss_rel = 1e-6;
// GPTQ's row loop vs the CPU's 16-row tiles: the same float operations per
// row (with the CPU's factor, no code differs on the seeded cases). With the
// factor from another Cholesky (cuSOLVER's; emulated in double here) the
// factor's last bits differ, a few weights cross a rounding boundary and the
// error propagates along the row, as between GPTQ and its double reference
// (gptq_code_mismatch). Measured: 0.19% of codes, loss 7.6e-4 relative.
constexpr double cuda_gptq_code_mismatch = 1e-2;
constexpr double cuda_gptq_loss_rel = 5e-3;
// Group scales come from the error-updated weights, so they inherit those
// flips: measured 1.1e-2 relative (Frobenius) at 3 bits, g128, act-order.
constexpr double cuda_gptq_scale_rel = 3e-2;
// The GPU's factor route (gather, potrf + trtri emulated in double, rotate)
// vs hinv_upper in float32: the float32 Cholesky of a damped Hessian with a
// condition number of ~1e4 loses ~1e-7 * 1e4 relative; 1e-3 in Frobenius norm.
constexpr double cuda_hinv_rel = 1e-3;

}  // namespace normtweak::test::tol
