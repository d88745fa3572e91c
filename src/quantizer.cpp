// Explicit instantiations of the quantizers (see config.h, NORMTWEAK_HEADER_ONLY).
#include "normtweak/detail/quantizer-inl.h"

namespace normtweak {
template class Quantizer<RTN>;
template class Quantizer<GPTQ>;
}  // namespace normtweak
