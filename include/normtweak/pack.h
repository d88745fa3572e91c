// Packing to and from the `gptq` checkpoint layout read by transformers,
// GPTQModel/AutoGPTQ and vLLM (checkpoint_format "gptq", a.k.a. v1):
//
//   qweight int32 [in_features * bits / 32, out_features]  codes packed along the input dimension
//   qzeros  int32 [ngroups, out_features * bits / 32]      (zero - 1) packed along the output dimension
//   scales  f16   [ngroups, out_features]
//   g_idx   int32 [in_features]                             group of each input column
//
// Values are packed as a little-endian bit stream: value k occupies bits
// [k*bits, (k+1)*bits) of the concatenated 32-bit words. For 2, 4 and 8 bits
// no value crosses a word; for 3 bits this is exactly AutoGPTQ's straddling
// layout (10 values, then one split 2+1 bits, 10 values, one split 1+2, 10).
//
// The v1 format stores zero - 1, masked to `bits`: a zero point of 0 (an
// asymmetric group whose weights are all >= 0) reads back correctly here but
// as maxq + 1 in readers that add 1 without masking.
#pragma once

#include "normtweak/detail/half.h"
#include "normtweak/quantizer.h"
#include "normtweak/tensor_view.h"

#include <cstdint>
#include <vector>

namespace normtweak {

struct GPTQPacked {
  int bits = 4;
  RowMatrix<std::int32_t> qweight;  // [in * bits / 32, out]
  RowMatrix<std::int32_t> qzeros;   // [ngroups, out * bits / 32]
  RowMatrix<std::uint16_t> scales;  // [ngroups, out], float16 bit patterns
  std::vector<std::int32_t> g_idx;  // [in]
};

struct GPTQUnpacked {
  RowMatrix<std::uint8_t> codes;    // [out, in]
  RowMatrix<float> scales;          // [out, ngroups], float32 values of the float16 scales
  RowMatrix<float> zeros;           // [out, ngroups]
  std::vector<std::int32_t> g_idx;  // [in]

  // Dequantized weights [out, in]: scale * (code - zero) of each column's group.
  RowMatrix<float> dequantize() const {
    RowMatrix<float> W(codes.rows(), codes.cols());
    for (Eigen::Index r = 0; r < codes.rows(); ++r)
      for (Eigen::Index c = 0; c < codes.cols(); ++c) {
        const auto g = g_idx[static_cast<std::size_t>(c)];
        W(r, c) = scales(r, g) * (static_cast<float>(codes(r, c)) - zeros(r, g));
      }
    return W;
  }
};

namespace detail {

inline void check_pack_bits(int bits) {
  NT_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8,
           "bits={} has no gptq checkpoint layout; the format supports 2, 3, 4 and 8", bits);
}

// Append value v (bits wide) at bit position pos of the word array, column `col`
// of a row-major [words, ld] int32 matrix.
inline void put_bits(std::int32_t* words, std::int64_t ld, std::int64_t col, std::int64_t pos, int bits,
                     std::uint32_t v) {
  const std::int64_t w = pos >> 5;
  const int off = static_cast<int>(pos & 31);
  auto* word = reinterpret_cast<std::uint32_t*>(words + w * ld + col);
  *word |= v << off;
  if (off + bits > 32) *reinterpret_cast<std::uint32_t*>(words + (w + 1) * ld + col) |= v >> (32 - off);
}

inline std::uint32_t get_bits(const std::int32_t* words, std::int64_t ld, std::int64_t col, std::int64_t pos,
                              int bits) {
  const std::int64_t w = pos >> 5;
  const int off = static_cast<int>(pos & 31);
  std::uint64_t v = static_cast<std::uint32_t>(words[w * ld + col]) >> off;
  if (off + bits > 32) v |= static_cast<std::uint64_t>(static_cast<std::uint32_t>(words[(w + 1) * ld + col])) << (32 - off);
  return static_cast<std::uint32_t>(v & ((1u << bits) - 1u));
}

}  // namespace detail

// codes [out, in] uint8, scales/zeros [out, ngroups] float32, g_idx [in] int32.
inline GPTQPacked pack_gptq(const TensorView& codes, const TensorView& scales, const TensorView& zeros,
                            const TensorView& g_idx, int bits) {
  detail::check_pack_bits(bits);
  require_rank(codes, 2, "codes");
  require_dtype(codes, dtype::u8, "codes");
  require_contiguous(codes, "codes");
  require_rank(scales, 2, "scales");
  require_dtype(scales, dtype::f32, "scales");
  require_contiguous(scales, "scales");
  require_rank(zeros, 2, "zeros");
  require_dtype(zeros, dtype::f32, "zeros");
  require_contiguous(zeros, "zeros");
  require_rank(g_idx, 1, "g_idx");
  require_dtype(g_idx, dtype::i32, "g_idx");
  require_contiguous(g_idx, "g_idx");
  for (const TensorView* t : {&codes, &scales, &zeros, &g_idx}) require_cpu(*t, "packing input");
  const std::int64_t out = codes.size(0), in = codes.size(1), G = scales.size(1);
  NT_CHECK((in * bits) % 32 == 0, "in_features={} at bits={} does not fill whole int32 words; the gptq layout needs "
           "in_features * bits to be a multiple of 32", in, bits);
  NT_CHECK((out * bits) % 32 == 0, "out_features={} at bits={} does not fill whole int32 words in qzeros; the gptq "
           "layout needs out_features * bits to be a multiple of 32", out, bits);
  NT_CHECK(scales.size(0) == out && zeros.size(0) == out && zeros.size(1) == G,
           "scales {} and zeros {} must both be [out_features={}, ngroups]", scales.shape_str(), zeros.shape_str(), out);
  NT_CHECK(g_idx.size(0) == in, "g_idx has {} entries but in_features={}", g_idx.size(0), in);
  const auto* C = codes.data_as<const std::uint8_t>();
  const auto* S = scales.data_as<const float>();
  const auto* Z = zeros.data_as<const float>();
  const auto* gi = g_idx.data_as<const std::int32_t>();
  const std::uint32_t maxq = (1u << bits) - 1u;

  GPTQPacked p;
  p.bits = bits;
  p.g_idx.assign(gi, gi + in);
  for (std::int64_t c = 0; c < in; ++c)
    NT_CHECK(gi[c] >= 0 && gi[c] < G, "g_idx[{}]={} is outside [0, ngroups={})", c, gi[c], G);
  p.qweight = RowMatrix<std::int32_t>::Zero(in * bits / 32, out);
  for (std::int64_t o = 0; o < out; ++o)
    for (std::int64_t c = 0; c < in; ++c) {
      const std::uint32_t v = C[o * in + c];
      NT_CHECK(v <= maxq, "code {} at [{}, {}] exceeds maxq={} for bits={}", v, o, c, maxq, bits);
      detail::put_bits(p.qweight.data(), out, o, c * bits, bits, v);
    }
  p.qzeros = RowMatrix<std::int32_t>::Zero(G, out * bits / 32);
  p.scales.resize(G, out);
  for (std::int64_t g = 0; g < G; ++g)
    for (std::int64_t o = 0; o < out; ++o) {
      const float z = Z[o * G + g];
      NT_CHECK(z >= 0.f && z <= static_cast<float>(maxq) && z == std::nearbyint(z),
               "zero point {} at [{}, {}] is not an integer in [0, {}]", z, o, g, maxq);
      const std::uint32_t stored = (static_cast<std::uint32_t>(z) - 1u) & maxq;
      // qzeros is [G, words]: one row per group, the bit stream runs along the row.
      detail::put_bits(p.qzeros.data() + g * p.qzeros.cols(), 1, 0, o * bits, bits, stored);
      p.scales(g, o) = detail::float_to_f16(S[o * G + g]);
    }
  return p;
}

inline GPTQPacked pack_gptq(const QuantResult& r, int bits) {
  const std::int64_t out = r.codes.rows(), in = r.codes.cols(), G = r.scales.cols();
  return pack_gptq(TensorView::of(r.codes.data(), {out, in}), TensorView::of(r.scales.data(), {out, G}),
                   TensorView::of(r.zeros.data(), {out, G}), TensorView::of(r.g_idx.data(), {in}), bits);
}

// qweight int32 [in*bits/32, out], qzeros int32 [G, out*bits/32], scales
// float16 [G, out] (dtype f16) or float32, g_idx int32 [in].
inline GPTQUnpacked unpack_gptq(const TensorView& qweight, const TensorView& qzeros, const TensorView& scales,
                                const TensorView& g_idx, int bits) {
  detail::check_pack_bits(bits);
  require_rank(qweight, 2, "qweight");
  require_dtype(qweight, dtype::i32, "qweight");
  require_contiguous(qweight, "qweight");
  require_rank(qzeros, 2, "qzeros");
  require_dtype(qzeros, dtype::i32, "qzeros");
  require_contiguous(qzeros, "qzeros");
  require_rank(scales, 2, "scales");
  require_contiguous(scales, "scales");
  NT_CHECK(scales.type() == dtype::f16 || scales.type() == dtype::f32, "scales must be float16 or float32, got {}",
           dtype_name(scales.type()));
  require_rank(g_idx, 1, "g_idx");
  require_dtype(g_idx, dtype::i32, "g_idx");
  require_contiguous(g_idx, "g_idx");
  for (const TensorView* t : {&qweight, &qzeros, &scales, &g_idx}) require_cpu(*t, "packed tensor");
  const std::int64_t out = qweight.size(1), in = qweight.size(0) * 32 / bits, G = scales.size(0);
  NT_CHECK((qweight.size(0) * 32) % bits == 0, "qweight has {} rows, not a whole number of {}-bit values",
           qweight.size(0), bits);
  NT_CHECK(g_idx.size(0) == in, "g_idx has {} entries but qweight holds in_features={} at bits={}", g_idx.size(0), in,
           bits);
  NT_CHECK(scales.size(1) == out, "scales has shape {} but qweight has out_features={}", scales.shape_str(), out);
  NT_CHECK(qzeros.size(0) == G && qzeros.size(1) * 32 == out * bits,
           "qzeros has shape {}, expected [{}, {}] for out_features={} at bits={}", qzeros.shape_str(), G,
           out * bits / 32, out, bits);
  const std::uint32_t maxq = (1u << bits) - 1u;
  GPTQUnpacked u;
  const auto* gi = g_idx.data_as<const std::int32_t>();
  u.g_idx.assign(gi, gi + in);
  for (std::int64_t c = 0; c < in; ++c)
    NT_CHECK(gi[c] >= 0 && gi[c] < G, "g_idx[{}]={} is outside [0, ngroups={})", c, gi[c], G);
  u.codes.resize(out, in);
  const auto* qw = qweight.data_as<const std::int32_t>();
  for (std::int64_t o = 0; o < out; ++o)
    for (std::int64_t c = 0; c < in; ++c)
      u.codes(o, c) = static_cast<std::uint8_t>(detail::get_bits(qw, out, o, c * bits, bits));
  u.scales.resize(out, G);
  u.zeros.resize(out, G);
  const auto* qz = qzeros.data_as<const std::int32_t>();
  for (std::int64_t g = 0; g < G; ++g)
    for (std::int64_t o = 0; o < out; ++o) {
      const std::uint32_t stored = detail::get_bits(qz + g * qzeros.size(1), 1, 0, o * bits, bits);
      u.zeros(o, g) = static_cast<float>((stored + 1u) & maxq);
      u.scales(o, g) = scales.type() == dtype::f16
                           ? detail::f16_to_float(scales.data_as<const std::uint16_t>()[g * out + o])
                           : scales.data_as<const float>()[g * out + o];
    }
  return u;
}

}  // namespace normtweak
