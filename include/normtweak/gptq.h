// GPTQ (Frantar et al. 2022, arXiv 2210.17323, Algorithm 1): quantize one
// column at a time and spread its error over the not-yet-quantized columns
// through the upper Cholesky factor of H^-1, with lazy batched updates.
#pragma once

#include "normtweak/quantizer.h"

#include <string>

namespace normtweak {

struct GPTQ {
  static constexpr const char* name = "gptq";
  struct config {
    int blocksize = 128;        // columns per lazy batch (paper §4, "Lazy Batch-Updates")
    double percdamp = 0.01;     // damping as a fraction of mean(diag(H))
    bool act_order = false;     // quantize columns by descending diag(H)
    bool static_groups = false; // group parameters from the unmodified weights, before any update
    int damp_retries = 3;       // on Cholesky failure, retry with percdamp * 10 this many times, then fall back to RTN
    std::string layer_name;     // used in messages only
  };
  static void validate(const config& c) {
    NT_CHECK(c.blocksize >= 1, "blocksize={} must be positive", c.blocksize);
    NT_CHECK(c.percdamp >= 0.0 && c.percdamp < 1e6, "percdamp={} must be non-negative (typical: 0.01)", c.percdamp);
    NT_CHECK(c.damp_retries >= 0, "damp_retries={} must be non-negative", c.damp_retries);
  }
};

#if NORMTWEAK_EXTERN_TEMPLATE
extern template class Quantizer<GPTQ>;
#endif

}  // namespace normtweak

#if !NORMTWEAK_EXTERN_TEMPLATE
#include "normtweak/detail/quantizer-inl.h"
#endif
