// Explicit instantiations of HessianAccumulator for float and double accumulation.
#include "normtweak/detail/hessian-inl.h"

namespace normtweak {
template class HessianAccumulator<float>;
template class HessianAccumulator<double>;
}  // namespace normtweak
