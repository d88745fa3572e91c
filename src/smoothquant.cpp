// ActAbsMax, smooth_factors and Quantizer<SmoothQuant>::quantize (see config.h, NORMTWEAK_HEADER_ONLY).
#include "normtweak/detail/smoothquant-inl.h"
