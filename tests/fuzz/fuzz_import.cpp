// Fuzz target: DLPack import (view_of / DLPackTensor) and the GPTQ-format
// loader (unpack_gptq) on arbitrary descriptions and contents. Every input
// must either be rejected with normtweak::error or be read strictly inside
// the memory it describes; AddressSanitizer and UBSan judge the second part.
//
// Built with clang's -fsanitize=fuzzer when available; otherwise
// standalone_driver.cpp feeds it seeded random inputs for a bounded time.
#include <normtweak/dlpack.h>
#include <normtweak/pack.h>
#include <normtweak/smoothquant.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

struct Reader {
  const std::uint8_t* p;
  std::size_t n;
  template <typename T>
  T get() {
    T v{};
    const std::size_t k = n < sizeof(T) ? n : sizeof(T);
    std::memcpy(&v, p, k);
    p += k;
    n -= k;
    return v;
  }
};

// A dimension: mostly small, sometimes extreme (negative, huge) to exercise the checks.
std::int64_t fuzz_dim(Reader& r) {
  const std::uint8_t kind = r.get<std::uint8_t>();
  if (kind < 200) return kind % 9;
  return r.get<std::int64_t>();
}

// The largest element offset a view reaches, or -1 when it is empty or too large to back with memory here.
std::int64_t reach(const normtweak::TensorView& v) {
  std::int64_t last = 0;
  for (int d = 0; d < v.rank(); ++d) {
    if (v.size(d) == 0) return -1;
    if (v.stride(d) < 0 || v.size(d) > (1 << 12) || v.stride(d) > (1 << 12)) return -1;
    last += (v.size(d) - 1) * v.stride(d);
  }
  return last < (1 << 16) ? last : -1;
}

void fuzz_dlpack(Reader& r) {
  DLTensor t{};
  std::int64_t shape[8], strides[8];
  t.ndim = r.get<std::uint8_t>() % 8;
  for (int i = 0; i < t.ndim; ++i) shape[i] = fuzz_dim(r);
  const bool strided = r.get<std::uint8_t>() & 1;
  for (int i = 0; i < t.ndim; ++i) strides[i] = fuzz_dim(r);
  t.shape = shape;
  t.strides = strided ? strides : nullptr;
  t.dtype.code = r.get<std::uint8_t>() % 6;
  t.dtype.bits = static_cast<std::uint8_t>(8 << (r.get<std::uint8_t>() % 4));
  t.dtype.lanes = (r.get<std::uint8_t>() % 8) == 0 ? 2 : 1;
  t.device.device_type = static_cast<DLDeviceType>(r.get<std::uint8_t>() % 4);
  t.device.device_id = 0;
  static double dummy;
  t.data = &dummy;
  try {
    normtweak::TensorView v = normtweak::view_of(t);
    const std::int64_t last = reach(v);
    if (last < 0 || v.dev() != normtweak::device::cpu() || v.rank() < 1) return;
    // Back the view with exactly the memory it describes, then read all of it.
    std::vector<double> buf(static_cast<std::size_t>(last + 1));  // elements are at most 8 bytes
    t.data = buf.data();
    normtweak::TensorView backed = normtweak::view_of(t);
    if (backed.type() == normtweak::dtype::f32 || backed.type() == normtweak::dtype::f16 ||
        backed.type() == normtweak::dtype::bf16 || backed.type() == normtweak::dtype::f64) {
      normtweak::ActAbsMax acts(backed.size(-1) > 0 ? backed.size(-1) : 1);
      acts.add_batch(backed);
    }
  } catch (const normtweak::error&) {
  }
}

void fuzz_unpack(Reader& r) {
  const int bits = r.get<std::uint8_t>() % 10;
  std::int64_t s[7];
  for (auto& d : s) d = r.get<std::uint8_t>() % 40 - 2;  // sizes, some negative, some mismatched
  std::vector<std::int32_t> qw(64 * 64), qz(64 * 64), gi(512);
  std::vector<float> sc(64 * 64);
  for (auto& v : qw) v = r.get<std::int32_t>();
  for (auto& v : qz) v = r.get<std::int32_t>();
  for (auto& v : gi) v = r.get<std::uint8_t>() % 20 - 1;
  for (auto& v : sc) v = static_cast<float>(r.get<std::int16_t>());
  try {
    using normtweak::TensorView;
    using normtweak::dtype;
    // Shapes are clamped so the arrays above always back them; the checks must reject mismatches.
    auto clamp = [](std::int64_t v, std::int64_t hi) { return v < 0 ? v : (v > hi ? hi : v); };
    TensorView qweight(qw.data(), dtype::i32, {clamp(s[0], 64), clamp(s[1], 64)});
    TensorView qzeros(qz.data(), dtype::i32, {clamp(s[2], 64), clamp(s[3], 64)});
    TensorView scales(sc.data(), dtype::f32, {clamp(s[4], 64), clamp(s[5], 64)});
    TensorView g_idx(gi.data(), dtype::i32, {clamp(s[6] * 8, 512)});
    normtweak::unpack_gptq(qweight, qzeros, scales, g_idx, bits);
  } catch (const normtweak::error&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Reader r{data, size};
  if (r.get<std::uint8_t>() & 1)
    fuzz_dlpack(r);
  else
    fuzz_unpack(r);
  return 0;
}
