// Prints the best GFLOP/s of C = A * B (float32, row-major A [M x K], B [K x N])
// over `reps` runs, with Eigen's own GEMM or with the BLAS (gemm_rate_blas).
// Usage: gemm_rate_{eigen,blas} M N K reps threads
#include <Eigen/Core>

#include <chrono>
#include <cstdio>
#include <cstdlib>

#if defined(GEMM_RATE_BLAS)
extern "C" void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                       const int*, const float*, const int*, const float*, float*, const int*);
#if defined(GEMM_RATE_OPENBLAS)
extern "C" void openblas_set_num_threads(int);
#endif
#endif

using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: %s M N K reps threads\n", argv[0]);
    return 2;
  }
  const int M = std::atoi(argv[1]), N = std::atoi(argv[2]), K = std::atoi(argv[3]), reps = std::atoi(argv[4]),
            threads = std::atoi(argv[5]);
  Eigen::setNbThreads(threads);
#if defined(GEMM_RATE_OPENBLAS)
  openblas_set_num_threads(threads);
#endif
  const Mat A = Mat::Random(M, K), B = Mat::Random(K, N);
  Mat C = Mat::Zero(M, N);
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
#if defined(GEMM_RATE_BLAS)
    const float alpha = 1.f, beta = 0.f;
    sgemm_("N", "N", &N, &M, &K, &alpha, B.data(), &N, A.data(), &K, &beta, C.data(), &N);
#else
    C.noalias() = A * B;
#endif
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::printf("%.3f\n", 2.0 * M * N * K / best / 1e9);
  return C(0, 0) == 12345.f ? 1 : 0;  // keep C alive
}
