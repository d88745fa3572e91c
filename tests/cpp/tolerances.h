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

}  // namespace normtweak::test::tol
