// Round to nearest: every weight snapped to its group's grid, no error feedback.
#pragma once

#include "normtweak/quantizer.h"

#include <string>

namespace normtweak {

struct RTN {
  static constexpr const char* name = "rtn";
  struct config {
    std::string layer_name;  // used in messages only
  };
  static void validate(const config&) {}
};

#if NORMTWEAK_EXTERN_TEMPLATE
extern template class Quantizer<RTN>;
#endif

}  // namespace normtweak

#if !NORMTWEAK_EXTERN_TEMPLATE
#include "normtweak/detail/quantizer-inl.h"
#endif
