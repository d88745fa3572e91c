// TensorView: a non-owning view of a strided tensor (pointer, dtype, shape,
// strides in elements, device). The C++ core and the kernels work on views;
// ownership stays with the caller (a torch tensor, a numpy array, an Eigen
// matrix). See dlpack.h for the conversion to and from DLPack.
#pragma once

#include "normtweak/error.h"

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>

namespace normtweak {

enum class dtype : std::uint8_t { f32, f64, f16, bf16, i32, u8 };

inline const char* dtype_name(dtype t) {
  switch (t) {
    case dtype::f32: return "float32";
    case dtype::f64: return "float64";
    case dtype::f16: return "float16";
    case dtype::bf16: return "bfloat16";
    case dtype::i32: return "int32";
    case dtype::u8: return "uint8";
  }
  return "unknown";
}

inline std::size_t dtype_size(dtype t) {
  switch (t) {
    case dtype::f32: case dtype::i32: return 4;
    case dtype::f64: return 8;
    case dtype::f16: case dtype::bf16: return 2;
    case dtype::u8: return 1;
  }
  return 0;
}

inline bool is_floating(dtype t) {
  return t == dtype::f32 || t == dtype::f64 || t == dtype::f16 || t == dtype::bf16;
}

template <typename T> struct dtype_of;
template <> struct dtype_of<float> { static constexpr dtype value = dtype::f32; };
template <> struct dtype_of<double> { static constexpr dtype value = dtype::f64; };
template <> struct dtype_of<std::int32_t> { static constexpr dtype value = dtype::i32; };
template <> struct dtype_of<std::uint8_t> { static constexpr dtype value = dtype::u8; };

enum class device_kind : std::uint8_t { cpu, cuda };

struct device {
  device_kind kind = device_kind::cpu;
  int ordinal = 0;

  static device cpu() { return {device_kind::cpu, 0}; }
  static device cuda(int ordinal) { return {device_kind::cuda, ordinal}; }
  bool operator==(const device& o) const { return kind == o.kind && ordinal == o.ordinal; }
  bool operator!=(const device& o) const { return !(*this == o); }
  std::string str() const {
    return kind == device_kind::cpu ? std::string("cpu") : fmt::format("cuda:{}", ordinal);
  }
};

class TensorView {
 public:
  static constexpr int kMaxRank = 6;

  TensorView() = default;

  // strides are in elements, as in DLPack; empty strides mean row-major contiguous.
  TensorView(void* data, dtype t, std::initializer_list<std::int64_t> shape,
             std::initializer_list<std::int64_t> strides = {}, device dev = device::cpu())
      : data_(data), dtype_(t), device_(dev) {
    init(shape.begin(), static_cast<int>(shape.size()),
         strides.size() ? strides.begin() : nullptr, static_cast<int>(strides.size()));
  }

  TensorView(void* data, dtype t, const std::int64_t* shape, int rank,
             const std::int64_t* strides = nullptr, device dev = device::cpu())
      : data_(data), dtype_(t), device_(dev) {
    init(shape, rank, strides, strides ? rank : 0);
  }

  // Views of typed host buffers, row-major.
  template <typename T>
  static TensorView of(T* data, std::initializer_list<std::int64_t> shape) {
    return TensorView(const_cast<std::remove_const_t<T>*>(data), dtype_of<std::remove_const_t<T>>::value, shape);
  }

  void* data() const { return data_; }
  template <typename T> T* data_as() const { return static_cast<T*>(data_); }
  dtype type() const { return dtype_; }
  device dev() const { return device_; }
  int rank() const { return rank_; }
  std::int64_t size(int d) const { return shape_[norm_dim(d)]; }
  std::int64_t stride(int d) const { return strides_[norm_dim(d)]; }
  const std::int64_t* shape() const { return shape_.data(); }
  const std::int64_t* strides() const { return strides_.data(); }

  std::int64_t numel() const {
    std::int64_t n = 1;
    for (int i = 0; i < rank_; ++i) n *= shape_[i];
    return n;
  }

  bool is_contiguous() const {
    std::int64_t expected = 1;
    for (int i = rank_ - 1; i >= 0; --i) {
      if (shape_[i] != 1 && strides_[i] != expected) return false;
      expected *= shape_[i];
    }
    return true;
  }

  std::string shape_str() const {
    std::string s = "[";
    for (int i = 0; i < rank_; ++i) s += fmt::format("{}{}", i ? ", " : "", shape_[i]);
    return s + "]";
  }
  std::string strides_str() const {
    std::string s = "[";
    for (int i = 0; i < rank_; ++i) s += fmt::format("{}{}", i ? ", " : "", strides_[i]);
    return s + "]";
  }

  // Collapse all leading dimensions into one: [b, s, n] -> [b*s, n]. Needs the
  // leading dimensions to be mutually contiguous (a view of a contiguous tensor).
  TensorView flatten_2d(const char* name) const {
    NT_CHECK(rank_ >= 1, "{} must have at least one dimension, got a scalar", name);
    if (rank_ == 1) {
      std::int64_t shp[2] = {1, shape_[0]};
      std::int64_t str[2] = {shape_[0] * strides_[0], strides_[0]};
      return TensorView(data_, dtype_, shp, 2, str, device_);
    }
    std::int64_t rows = 1;
    for (int i = 0; i < rank_ - 1; ++i) rows *= shape_[i];
    for (int i = 0; i < rank_ - 2; ++i)
      NT_CHECK(shape_[i] == 1 || strides_[i] == strides_[i + 1] * shape_[i + 1],
               "{} with shape {} and strides {} cannot be flattened to 2-D without a copy; "
               "pass a contiguous tensor (.contiguous())", name, shape_str(), strides_str());
    std::int64_t shp[2] = {rows, shape_[rank_ - 1]};
    std::int64_t str[2] = {strides_[rank_ - 2], strides_[rank_ - 1]};
    if (rows == 1) str[0] = shape_[rank_ - 1] * strides_[rank_ - 1];
    return TensorView(data_, dtype_, shp, 2, str, device_);
  }

 private:
  int norm_dim(int d) const {
    int nd = d < 0 ? d + rank_ : d;
    NT_CHECK(nd >= 0 && nd < rank_, "dimension {} out of range for a tensor of rank {}", d, rank_);
    return nd;
  }

  template <typename It>
  void init(It shape, int rank, const std::int64_t* strides, int nstrides) {
    NT_CHECK(rank >= 0 && rank <= kMaxRank, "tensor rank {} exceeds the supported maximum {}", rank, kMaxRank);
    NT_CHECK(nstrides == 0 || nstrides == rank, "got {} strides for a tensor of rank {}", nstrides, rank);
    rank_ = rank;
    std::int64_t n = 1;
    for (int i = 0; i < rank; ++i) {
      shape_[i] = shape[i];
      NT_CHECK(shape_[i] >= 0, "negative size {} in dimension {}", shape_[i], i);
    }
    // Element counts and offsets are int64: a shape whose size overflows it cannot describe real memory.
    for (int i = 0; i < rank; ++i)
      NT_CHECK(!__builtin_mul_overflow(n, shape_[i], &n), "tensor shape {} has more elements than fit in int64",
               shape_str());
    std::int64_t acc = 1;
    for (int i = rank - 1; i >= 0; --i) {
      strides_[i] = strides ? strides[i] : acc;
      // Overflows only when another dimension is 0 (n == 0): nothing is addressed then.
      if (__builtin_mul_overflow(acc, shape_[i], &acc)) acc = 0;
    }
    if (n > 0)
      for (int i = 0; i < rank; ++i) {
        std::int64_t span = 0;
        NT_CHECK(strides_[i] != std::numeric_limits<std::int64_t>::min() &&
                     !__builtin_mul_overflow(shape_[i] - 1, strides_[i] < 0 ? -strides_[i] : strides_[i], &span),
                 "tensor of shape {} with strides {} reaches offsets beyond int64", shape_str(), strides_str());
      }
    NT_CHECK(n == 0 || data_ != nullptr, "tensor of shape {} has a null data pointer", shape_str());
  }

  void* data_ = nullptr;
  dtype dtype_ = dtype::f32;
  device device_{};
  int rank_ = 0;
  std::array<std::int64_t, kMaxRank> shape_{};
  std::array<std::int64_t, kMaxRank> strides_{};
};

// Validation helpers. `name` is the argument's name as the user knows it.
inline void require_rank(const TensorView& t, int rank, const char* name) {
  NT_CHECK(t.rank() == rank, "{} must have rank {}, got rank {} (shape {})", name, rank, t.rank(), t.shape_str());
}

inline void require_floating(const TensorView& t, const char* name) {
  NT_CHECK(is_floating(t.type()), "{} must be float32, float64, float16 or bfloat16, got {}", name, dtype_name(t.type()));
}

inline void require_dtype(const TensorView& t, dtype want, const char* name) {
  NT_CHECK(t.type() == want, "{} must be {}, got {}", name, dtype_name(want), dtype_name(t.type()));
}

inline void require_cpu(const TensorView& t, const char* name) {
  NT_CHECK(t.dev().kind == device_kind::cpu,
           "{} is on {}, but this operation runs on the CPU; move it with .cpu() or build with CUDA", name,
           t.dev().str());
}

inline void require_contiguous(const TensorView& t, const char* name) {
  NT_CHECK(t.is_contiguous(), "{} must be contiguous (row-major), got shape {} with strides {}; call .contiguous()",
           name, t.shape_str(), t.strides_str());
}

inline void require_inner_contiguous(const TensorView& t, const char* name) {
  NT_CHECK(t.rank() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1,
           "{} must be contiguous in its last dimension, got shape {} with strides {}; call .contiguous()", name,
           t.shape_str(), t.strides_str());
}

inline void require_same_device(const TensorView& a, const char* an, const TensorView& b, const char* bn) {
  NT_CHECK(a.dev() == b.dev(), "{} is on {} but {} is on {}; put both on one device", an, a.dev().str(), bn,
           b.dev().str());
}

}  // namespace normtweak
