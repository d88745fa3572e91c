// Thread count for normtweak's CPU work: its own parallel loops (OpenMP) and
// the BLAS it calls. Settable so that it does not fight PyTorch's threads:
// call set_num_threads(torch.get_num_threads()) or fewer.
#pragma once

#include "normtweak/error.h"

#include <atomic>
#include <thread>

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(NORMTWEAK_OPENBLAS)
extern "C" void openblas_set_num_threads(int);
#endif

namespace normtweak {

namespace detail {
inline std::atomic<int>& thread_count() {
  static std::atomic<int> n{[] {
    const unsigned hw = std::thread::hardware_concurrency();
    return hw ? static_cast<int>(hw) : 1;
  }()};
  return n;
}
}  // namespace detail

inline int num_threads() { return detail::thread_count().load(std::memory_order_relaxed); }

inline void set_num_threads(int n) {
  NT_CHECK(n >= 1, "num_threads={} must be at least 1", n);
  detail::thread_count().store(n, std::memory_order_relaxed);
#if defined(NORMTWEAK_OPENBLAS)
  openblas_set_num_threads(n);
#endif
}

}  // namespace normtweak
