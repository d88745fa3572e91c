#include "reference.h"

#include <catch2/catch.hpp>

#include <cmath>

using namespace normtweak;

TEST_CASE("TensorView shape, strides, contiguity and validation", "[tensor_view]") {
  std::vector<float> buf(24);
  TensorView v = TensorView::of(buf.data(), {2, 3, 4});
  CHECK(v.rank() == 3);
  CHECK(v.numel() == 24);
  CHECK(v.stride(0) == 12);
  CHECK(v.stride(-1) == 1);
  CHECK(v.is_contiguous());
  const TensorView f = v.flatten_2d("x");
  CHECK(f.size(0) == 6);
  CHECK(f.size(1) == 4);

  TensorView t(buf.data(), dtype::f32, {4, 6}, {1, 4});  // a transpose
  CHECK_FALSE(t.is_contiguous());
  CHECK_THROWS_WITH(require_contiguous(t, "W"), Catch::Contains("W must be contiguous") && Catch::Contains("[1, 4]"));
  CHECK_THROWS_WITH(require_inner_contiguous(t, "X"), Catch::Contains("X must be contiguous in its last dimension"));
  CHECK_THROWS_WITH(require_rank(v, 2, "W"), Catch::Contains("W must have rank 2, got rank 3"));
  CHECK_THROWS_WITH(require_dtype(v, dtype::f16, "x"), Catch::Contains("x must be float16, got float32"));
  CHECK_THROWS_WITH(TensorView(nullptr, dtype::f32, {2, 2}), Catch::Contains("null data pointer"));
  CHECK_NOTHROW(TensorView(nullptr, dtype::f32, {0, 2}));
  CHECK_THROWS_WITH(TensorView(buf.data(), dtype::f32, {2, -1}), Catch::Contains("negative size -1"));
  TensorView g(buf.data(), dtype::f32, {2, 2}, {}, device::cuda(1));
  CHECK_THROWS_WITH(require_same_device(v, "W", g, "H"), Catch::Contains("W is on cpu but H is on cuda:1"));
  CHECK_THROWS_WITH(require_cpu(g, "H"), Catch::Contains("H is on cuda:1"));
  // A non-mergeable leading pair cannot be flattened without a copy.
  TensorView nm(buf.data(), dtype::f32, {2, 3, 2}, {2, 8, 1});
  CHECK_THROWS_WITH(nm.flatten_2d("X"), Catch::Contains("cannot be flattened"));
}

TEST_CASE("DLPack export and import are zero-copy and release the owner", "[dlpack]") {
  auto owner = std::make_shared<std::vector<float>>(12, 1.5f);
  std::weak_ptr<std::vector<float>> watch = owner;
  TensorView v = TensorView::of(owner->data(), {3, 4});
  DLManagedTensor* m = to_dlpack(v, owner);
  owner.reset();
  REQUIRE_FALSE(watch.expired());  // the DLManagedTensor keeps the memory alive
  CHECK(m->dl_tensor.ndim == 2);
  CHECK(m->dl_tensor.dtype.code == kDLFloat);
  CHECK(m->dl_tensor.dtype.bits == 32);
  {
    DLPackTensor imported(m);
    CHECK(imported.view().data() == v.data());
    CHECK(imported.view().size(0) == 3);
    CHECK(imported.view().stride(0) == 4);
    CHECK(imported.view().dev() == device::cpu());
  }
  CHECK(watch.expired());  // the importer called the deleter
}

TEST_CASE("DLPack import rejects what normtweak cannot take", "[dlpack][errors]") {
  float x[4] = {0, 0, 0, 0};
  std::int64_t shape[1] = {4};
  DLTensor t{};
  t.data = x;
  t.device = {kDLCPU, 0};
  t.ndim = 1;
  t.shape = shape;
  t.dtype = {kDLFloat, 32, 1};
  CHECK(view_of(t).numel() == 4);
  t.dtype = {kDLFloat, 32, 4};
  CHECK_THROWS_WITH(view_of(t), Catch::Contains("4 vector lanes"));
  t.dtype = {kDLInt, 16, 1};
  CHECK_THROWS_WITH(view_of(t), Catch::Contains("code=0, bits=16"));
  t.dtype = {kDLFloat, 32, 1};
  t.device = {kDLOpenCL, 0};
  CHECK_THROWS_WITH(view_of(t), Catch::Contains("device type 4"));
  t.device = {kDLCUDA, 2};
  CHECK(view_of(t).dev() == device::cuda(2));
  t.device = {kDLCPU, 0};
  t.data = nullptr;
  CHECK_THROWS_WITH(view_of(t), Catch::Contains("null data pointer"));
  t.data = x;
  t.ndim = 9;
  CHECK_THROWS_WITH(view_of(t), Catch::Contains("ndim=9"));
  // The importer still releases a tensor it rejects.
  static bool deleted = false;
  auto* m = new DLManagedTensor{};
  m->dl_tensor = t;
  m->deleter = [](DLManagedTensor* self) { deleted = true; delete self; };
  CHECK_THROWS(DLPackTensor(m));
  CHECK(deleted);
}

TEST_CASE("float16 and bfloat16 conversions round to nearest even", "[half]") {
  using namespace normtweak::detail;
  for (float f : {0.f, -0.f, 1.f, -2.5f, 65504.f, 6.1035156e-05f, 5.9604645e-08f, 3.14159f, 1e-3f})
    CHECK(f16_to_float(float_to_f16(f)) == Approx(f).epsilon(1e-3));
  CHECK(float_to_f16(1.f) == 0x3c00);
  CHECK(float_to_f16(65520.f) == 0x7c00);           // rounds to inf
  CHECK(float_to_f16(1.f + 1.f / 2048.f) == 0x3c00);  // tie -> even
  CHECK(float_to_f16(1.f + 3.f / 2048.f) == 0x3c02);  // tie -> even (up)
  CHECK(float_to_f16(2.98023224e-08f) == 0x0000);   // half of the smallest subnormal -> even (0)
  CHECK(float_to_f16(8.94069672e-08f) == 0x0002);   // 1.5 ulp -> 2
  CHECK(std::isnan(f16_to_float(float_to_f16(std::nanf("")))));
  CHECK(float_to_bf16(1.f) == 0x3f80);
  CHECK(bf16_to_float(float_to_bf16(3.140625f)) == 3.140625f);
  CHECK(float_to_bf16(1.f + 1.f / 256.f) == 0x3f80);  // tie -> even
  // Exhaustive: every finite float16 survives a round trip through float.
  for (std::uint32_t h = 0; h < 0x10000; ++h) {
    const float f = f16_to_float(static_cast<std::uint16_t>(h));
    if (std::isfinite(f)) REQUIRE(float_to_f16(f) == h);
  }
}

TEST_CASE("CUDA tensors without the CUDA back-end, and mixed devices, are clear errors", "[dispatch]") {
  // This test program does not link normtweak::cuda, so nothing is registered.
  REQUIRE(cuda_backend_slot() == nullptr);
  float host[64] = {};
  const TensorView W(host, dtype::f32, {4, 16}, {}, device::cuda(0));
  const TensorView Hc(host, dtype::f32, {16, 16}, {}, device::cpu());
  QuantSpec spec;
  CHECK_THROWS_WITH(Quantizer<RTN>(spec).quantize(W),
                    Catch::Contains("W is on cuda:0, but this build of normtweak has no CUDA back-end; link "
                                    "normtweak::cuda"));
  CHECK_THROWS_WITH(Quantizer<GPTQ>(spec).quantize(W, Hc), Catch::Contains("W is on cuda:0 but H is on cpu"));
  const TensorView f(host, dtype::f32, {4, 16}, {}, device::cuda(1));
  const TensorView q(host, dtype::f32, {4, 16}, {}, device::cuda(0));
  CHECK_THROWS_WITH(channel_dist_loss(f, q, DistLoss::dist),
                    Catch::Contains("f (float output) is on cuda:1 but q (quantized output) is on cuda:0"));
}
