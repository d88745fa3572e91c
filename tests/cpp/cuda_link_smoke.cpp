// Links against normtweak::cuda (cudart included) and calls the launcher on an
// empty problem, which returns before touching the device: proves the CUDA
// target compiles and links on a machine without a GPU.
#include "rtn_kernel.h"

#include <cstdio>

int main() {
  normtweak::cuda::RtnParams p{};
  const int rc = normtweak::cuda::launch_rtn(p, nullptr);
  std::printf("launch_rtn on an empty problem: %d\n", rc);
  return rc;
}
