// The few dense kernels the core needs, on row-major float/double buffers:
// C -= A * B, the symmetric rank-k update, Cholesky and triangular inverse.
// With NORMTWEAK_USE_BLAS they call the BLAS/LAPACK the library was built
// against (OpenBLAS on Debian reaches ~70% of FMA peak on GEMM, Eigen's own
// kernels ~40%); without it they use Eigen.
//
// Row-major buffers are column-major buffers of the transpose, so a row-major
// "lower" triangle is a column-major "upper" one; the calls below pass the
// flipped flags accordingly.
#pragma once

#include <Eigen/Core>
#include <Eigen/Cholesky>

#include <cstdint>

#if defined(NORMTWEAK_USE_BLAS)
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*);
void ssyrk_(const char*, const char*, const int*, const int*, const float*, const float*, const int*, const float*,
            float*, const int*);
void dsyrk_(const char*, const char*, const int*, const int*, const double*, const double*, const int*, const double*,
            double*, const int*);
void spotrf_(const char*, const int*, float*, const int*, int*);
void strtri_(const char*, const char*, const int*, float*, const int*, int*);
}
#endif

namespace normtweak::detail {

template <typename T>
using RowMat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename T>
using RowMap = Eigen::Map<RowMat<T>, 0, Eigen::OuterStride<>>;
template <typename T>
using ConstRowMap = Eigen::Map<const RowMat<T>, 0, Eigen::OuterStride<>>;

// C[m x n] -= A[m x k] * B[k x n], all row-major with leading dimensions.
inline void gemm_sub(int m, int n, int k, const float* A, int lda, const float* B, int ldb, float* C, int ldc) {
  if (m == 0 || n == 0 || k == 0) return;
#if defined(NORMTWEAK_USE_BLAS)
  const float alpha = -1.f, beta = 1.f;
  sgemm_("N", "N", &n, &m, &k, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
#else
  RowMap<float>(C, m, n, Eigen::OuterStride<>(ldc)).noalias() -=
      ConstRowMap<float>(A, m, k, Eigen::OuterStride<>(lda)) * ConstRowMap<float>(B, k, n, Eigen::OuterStride<>(ldb));
#endif
}

// Lower triangle (row-major) of H[n x n] = beta * H + alpha * X^T X, X[k x n]
// row-major. Only the lower triangle is read and written.
template <typename T>
inline void syrk_lower(int n, int k, T alpha, const T* X, int ldx, T beta, T* H, int ldh) {
  if (n == 0) return;
#if defined(NORMTWEAK_USE_BLAS)
  if constexpr (std::is_same_v<T, float>)
    ssyrk_("U", "N", &n, &k, &alpha, X, &ldx, &beta, H, &ldh);
  else
    dsyrk_("U", "N", &n, &k, &alpha, X, &ldx, &beta, H, &ldh);
#else
  RowMap<T> Hm(H, n, n, Eigen::OuterStride<>(ldh));
  Hm.template triangularView<Eigen::Lower>() *= beta;
  if (k > 0)
    Hm.template selfadjointView<Eigen::Lower>().rankUpdate(
        ConstRowMap<T>(X, k, n, Eigen::OuterStride<>(ldx)).transpose(), alpha);
#endif
}

// In-place Cholesky A = L L^T of a row-major n x n matrix; L lands in the
// lower triangle. Returns 0 on success, else the (1-based) order of the
// leading minor that is not positive definite.
inline int cholesky_lower(int n, float* A, int lda) {
#if defined(NORMTWEAK_USE_BLAS)
  int info = 0;
  spotrf_("U", &n, A, &lda, &info);
  return info;
#else
  RowMap<float> Am(A, n, n, Eigen::OuterStride<>(lda));
  Eigen::LLT<Eigen::Ref<RowMat<float>>, Eigen::Lower> llt(Am);
  if (llt.info() != Eigen::Success) return 1;
  return 0;
#endif
}

// In-place inverse of the lower-triangular L (row-major, non-unit diagonal).
inline int invert_lower(int n, float* L, int ldl) {
#if defined(NORMTWEAK_USE_BLAS)
  int info = 0;
  strtri_("U", "N", &n, L, &ldl, &info);
  return info;
#else
  RowMap<float> Lm(L, n, n, Eigen::OuterStride<>(ldl));
  RowMat<float> I = RowMat<float>::Identity(n, n);
  Lm.template triangularView<Eigen::Lower>().solveInPlace(I);
  Lm.template triangularView<Eigen::Lower>() = I;
  return 0;
#endif
}

}  // namespace normtweak::detail
