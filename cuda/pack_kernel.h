// GPTQ packing on the GPU: one thread builds one int32 word of qweight
// [in * bits / 32, out] (or of a qzeros row) from the codes whose bit ranges
// overlap it, so no two threads write the same word and no atomics are needed.
// Same layout as pack_gptq() in normtweak/pack.h (3-bit codes straddle words).
#pragma once

#include "normtweak/config.h"

#include <cstdint>

namespace normtweak::cuda {

// The 32 bits of word `w` of a bit stream in which item i occupies bits
// [i * bits, (i + 1) * bits); item(i) returns the value of item i.
template <typename Item>
NT_HOST_DEVICE inline std::uint32_t pack_word(std::int64_t w, std::int64_t items, int bits, Item item) {
  const std::int64_t lo = w * 32, hi = lo + 32;
  std::uint32_t word = 0;
  for (std::int64_t i = lo / bits; i < items && i * bits < hi; ++i) {
    const std::int64_t shift = i * bits - lo;
    const std::uint32_t v = item(i);
    word |= shift >= 0 ? v << shift : v >> (-shift);
  }
  return word;
}

struct PackParams {
  const std::uint8_t* codes;  // [out, in] contiguous
  const float* zeros;         // [out, G]
  std::int32_t* qweight;      // [in * bits / 32, out]
  std::int32_t* qzeros;       // [G, out * bits / 32]
  std::int64_t out, in, G;
  int bits;
};

// Word (w, o) of qweight: column o's codes along the input dimension.
NT_HOST_DEVICE inline void pack_qweight_word(const PackParams& p, std::int64_t w, std::int64_t o) {
  const std::uint8_t* c = p.codes + o * p.in;
  p.qweight[w * p.out + o] = static_cast<std::int32_t>(
      pack_word(w, p.in, p.bits, [c](std::int64_t i) { return static_cast<std::uint32_t>(c[i]); }));
}

// Word w of qzeros row g: the zero points minus one (the gptq v1 convention), masked to `bits`.
NT_HOST_DEVICE inline void pack_qzeros_word(const PackParams& p, std::int64_t g, std::int64_t w) {
  const float* z = p.zeros;
  const std::int64_t G = p.G;
  const std::uint32_t mask = (1u << p.bits) - 1u;
  p.qzeros[g * (p.out * p.bits / 32) + w] = static_cast<std::int32_t>(pack_word(
      w, p.out, p.bits, [z, G, g, mask](std::int64_t o) { return (static_cast<std::uint32_t>(z[o * G + g]) - 1u) & mask; }));
}

constexpr int kPackThreads = 256;

// Both kernels on `stream` (a cudaStream_t); the caller has checked the inputs
// as pack_gptq() does. Returns the CUDA error code.
int launch_pack_gptq(const PackParams& p, void* stream);

}  // namespace normtweak::cuda
