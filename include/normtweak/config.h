// Build-time configuration shared by every normtweak header.
#pragma once

#define NORMTWEAK_VERSION_MAJOR 0
#define NORMTWEAK_VERSION_MINOR 1
#define NORMTWEAK_VERSION_PATCH 0
#define NORMTWEAK_VERSION_STRING "0.1.0"

// NORMTWEAK_HEADER_ONLY: include the template bodies (detail/*-inl.h) in every
// translation unit instead of linking the explicit instantiations in src/.
// Same switch as fmt's FMT_HEADER_ONLY.
#if defined(NORMTWEAK_HEADER_ONLY)
#define NORMTWEAK_EXTERN_TEMPLATE 0
#define NORMTWEAK_FUNC inline  // non-template bodies in *-inl.h (fmt's FMT_FUNC)
#else
#define NORMTWEAK_EXTERN_TEMPLATE 1
#define NORMTWEAK_FUNC
#endif

#if defined(__CUDACC__)
#define NT_HOST_DEVICE __host__ __device__
#else
#define NT_HOST_DEVICE
#endif

namespace normtweak {
// The "reldist" loss's floor under each channel's float variance (channel_dist_loss.h; the CPU and CUDA paths).
inline constexpr double kRelDistVarFloor = 1e-6;
}  // namespace normtweak
