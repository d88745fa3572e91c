// Conversion between TensorView and DLPack (dlpack.h v0.6, DLManagedTensor),
// both directions zero-copy.
//
//  * Import: DLPackTensor takes ownership of a DLManagedTensor (as handed over
//    by torch's __dlpack__) and calls its deleter when destroyed; view() is a
//    TensorView of the same memory.
//  * Export: to_dlpack(view, owner) wraps a view in a DLManagedTensor whose
//    deleter releases `owner` (a shared_ptr keeping the memory alive).
#pragma once

#include "normtweak/tensor_view.h"

#include <dlpack/dlpack.h>

#include <memory>
#include <utility>
#include <vector>

namespace normtweak {

inline dtype dtype_from_dlpack(DLDataType t) {
  NT_CHECK(t.lanes == 1, "DLPack tensors with {} vector lanes are not supported; pass a plain tensor", t.lanes);
  if (t.code == kDLFloat && t.bits == 32) return dtype::f32;
  if (t.code == kDLFloat && t.bits == 64) return dtype::f64;
  if (t.code == kDLFloat && t.bits == 16) return dtype::f16;
  if (t.code == kDLBfloat && t.bits == 16) return dtype::bf16;
  if (t.code == kDLInt && t.bits == 32) return dtype::i32;
  if (t.code == kDLUInt && t.bits == 8) return dtype::u8;
  NT_THROW(errc::invalid_argument,
           "unsupported DLPack dtype (code={}, bits={}); use float32, float64, float16, bfloat16, int32 or uint8",
           static_cast<int>(t.code), static_cast<int>(t.bits));
}

inline DLDataType dtype_to_dlpack(dtype t) {
  DLDataType d{};
  d.lanes = 1;
  switch (t) {
    case dtype::f32: d.code = kDLFloat; d.bits = 32; break;
    case dtype::f64: d.code = kDLFloat; d.bits = 64; break;
    case dtype::f16: d.code = kDLFloat; d.bits = 16; break;
    case dtype::bf16: d.code = kDLBfloat; d.bits = 16; break;
    case dtype::i32: d.code = kDLInt; d.bits = 32; break;
    case dtype::u8: d.code = kDLUInt; d.bits = 8; break;
  }
  return d;
}

inline device device_from_dlpack(DLDevice d) {
  if (d.device_type == kDLCPU) return device::cpu();
  if (d.device_type == kDLCUDA) return device::cuda(d.device_id);
  NT_THROW(errc::invalid_argument,
           "unsupported DLPack device type {} (device_id={}); normtweak takes CPU (1) or CUDA (2) tensors",
           static_cast<int>(d.device_type), d.device_id);
}

// A view of the memory a DLTensor describes. Does not take ownership.
inline TensorView view_of(const DLTensor& t) {
  NT_CHECK(t.ndim >= 0 && t.ndim <= TensorView::kMaxRank, "DLPack tensor has ndim={}, supported: 0..{}", t.ndim,
           TensorView::kMaxRank);
  NT_CHECK(t.shape != nullptr || t.ndim == 0, "DLPack tensor with ndim={} has a null shape", t.ndim);
  const dtype dt = dtype_from_dlpack(t.dtype);
  const device dev = device_from_dlpack(t.device);
  char* base = static_cast<char*>(t.data);
  if (base != nullptr) base += t.byte_offset;
  return TensorView(base, dt, t.shape, t.ndim, t.strides, dev);
}

class DLPackTensor {
 public:
  DLPackTensor() = default;
  explicit DLPackTensor(DLManagedTensor* m) : m_(m) {
    NT_CHECK(m != nullptr, "null DLManagedTensor");
    try {
      view_ = view_of(m->dl_tensor);
    } catch (...) {
      release();
      throw;
    }
  }
  DLPackTensor(const DLPackTensor&) = delete;
  DLPackTensor& operator=(const DLPackTensor&) = delete;
  DLPackTensor(DLPackTensor&& o) noexcept : m_(std::exchange(o.m_, nullptr)), view_(o.view_) {}
  DLPackTensor& operator=(DLPackTensor&& o) noexcept {
    if (this != &o) {
      release();
      m_ = std::exchange(o.m_, nullptr);
      view_ = o.view_;
    }
    return *this;
  }
  ~DLPackTensor() { release(); }

  const TensorView& view() const { return view_; }

 private:
  void release() {
    if (m_ && m_->deleter) m_->deleter(m_);
    m_ = nullptr;
  }
  DLManagedTensor* m_ = nullptr;
  TensorView view_;
};

namespace detail {
struct dlpack_export_ctx {
  DLManagedTensor managed{};
  std::vector<std::int64_t> shape, strides;
  std::shared_ptr<void> owner;
};
}  // namespace detail

// Wrap `v` in a DLManagedTensor; the memory stays alive until the consumer
// calls the deleter, which drops this reference to `owner`.
inline DLManagedTensor* to_dlpack(const TensorView& v, std::shared_ptr<void> owner) {
  auto* ctx = new detail::dlpack_export_ctx;
  ctx->shape.assign(v.shape(), v.shape() + v.rank());
  ctx->strides.assign(v.strides(), v.strides() + v.rank());
  ctx->owner = std::move(owner);
  DLTensor& t = ctx->managed.dl_tensor;
  t.data = v.data();
  t.device.device_type = v.dev().kind == device_kind::cpu ? kDLCPU : kDLCUDA;
  t.device.device_id = v.dev().ordinal;
  t.ndim = v.rank();
  t.dtype = dtype_to_dlpack(v.type());
  t.shape = ctx->shape.data();
  t.strides = ctx->strides.data();
  t.byte_offset = 0;
  ctx->managed.manager_ctx = ctx;
  ctx->managed.deleter = [](DLManagedTensor* self) { delete static_cast<detail::dlpack_export_ctx*>(self->manager_ctx); };
  return &ctx->managed;
}

}  // namespace normtweak
