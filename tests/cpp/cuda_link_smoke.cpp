// Links against normtweak::cuda (cudart, cuBLAS, cuSOLVER) and checks, without
// a GPU, that the target registered its back-end with the core's dispatch and
// that the launchers return before touching the device on empty problems.
#include "backend.h"
#include "rtn_kernel.h"

#include <cstdio>

int main() {
  if (normtweak::cuda_backend_slot() == nullptr) {
    std::printf("normtweak::cuda did not register its back-end\n");
    return 1;
  }
  normtweak::cuda::RtnParams p{};
  const int rc = normtweak::cuda::launch_rtn(p, nullptr);
  std::printf("back-end registered; launch_rtn on an empty problem: %d\n", rc);
  return rc;
}
