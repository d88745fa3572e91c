// Compiled into every program that links normtweak::cuda (an INTERFACE source
// of the target): fills the core's dispatch table before main(), so CUDA
// tensors passed to the core's entry points take the CUDA path.
#include "backend.h"

namespace {
const bool normtweak_cuda_registered = (normtweak::cuda::register_backend(), true);
}  // namespace
