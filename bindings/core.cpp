// pybind11 module normtweak._core: the only place that knows about Python.
// Tensors cross by DLPack in both directions, zero-copy: inputs are any object
// with __dlpack__ (torch, numpy, ...); outputs are DLPackArray objects that
// torch.from_dlpack / numpy.from_dlpack take without copying.
#include "normtweak/normtweak.h"

#include <pybind11/functional.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>

namespace py = pybind11;
using namespace normtweak;

namespace {

constexpr const char* kCapsuleName = "dltensor";
constexpr const char* kUsedCapsuleName = "used_dltensor";

// Take ownership of the DLManagedTensor behind obj.__dlpack__() (or a capsule).
DLPackTensor import_tensor(const py::handle& obj, const char* name) {
  py::object cap;
  if (PyCapsule_CheckExact(obj.ptr())) {
    cap = py::reinterpret_borrow<py::object>(obj);
  } else if (py::hasattr(obj, "__dlpack__")) {
    try {
      cap = obj.attr("__dlpack__")();
    } catch (py::error_already_set& e) {
      throw error(errc::invalid_argument, fmt::format("{} could not be exported by DLPack: {}", name, e.what()));
    }
  } else {
    throw error(errc::invalid_argument,
                fmt::format("{} must be a tensor or array supporting DLPack (torch.Tensor, numpy.ndarray), got {}",
                            name, py::str(py::type::of(obj)).cast<std::string>()));
  }
  auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap.ptr(), kCapsuleName));
  if (m == nullptr) {
    PyErr_Clear();
    throw error(errc::invalid_argument,
                fmt::format("{}: DLPack capsule was already consumed or is not a 'dltensor' capsule", name));
  }
  PyCapsule_SetName(cap.ptr(), kUsedCapsuleName);
  PyCapsule_SetDestructor(cap.ptr(), nullptr);
  return DLPackTensor(m);
}

// A tensor owned by C++ (a result buffer) that Python frameworks can take
// through __dlpack__ without a copy.
class DLPackArray {
 public:
  DLPackArray(TensorView v, std::shared_ptr<void> owner) : view_(v), owner_(std::move(owner)) {}

  py::capsule dlpack(const py::kwargs&) const {
    DLManagedTensor* m = to_dlpack(view_, owner_);
    return py::capsule(m, kCapsuleName, [](PyObject* cap) {
      // Called when the capsule dies; a consumer that took it renamed it.
      if (PyCapsule_IsValid(cap, kCapsuleName)) {
        auto* mt = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap, kCapsuleName));
        if (mt && mt->deleter) mt->deleter(mt);
      }
    });
  }
  py::tuple device() const { return py::make_tuple(1, 0); }  // (kDLCPU, 0)
  std::vector<std::int64_t> shape() const { return {view_.shape(), view_.shape() + view_.rank()}; }
  std::string dtype_str() const { return dtype_name(view_.type()); }

 private:
  TensorView view_;
  std::shared_ptr<void> owner_;
};

template <typename T>
DLPackArray export_matrix(const std::shared_ptr<void>& owner, const RowMatrix<T>& M) {
  return DLPackArray(TensorView::of(M.data(), {M.rows(), M.cols()}), owner);
}
template <typename T>
DLPackArray export_vector(const std::shared_ptr<void>& owner, const std::vector<T>& v) {
  return DLPackArray(TensorView::of(v.data(), {static_cast<std::int64_t>(v.size())}), owner);
}

QuantSpec make_spec(int bits, int group_size, bool sym, bool mse, float mse_norm, int mse_grid, float mse_maxshrink) {
  QuantSpec s;
  s.bits = bits;
  s.group_size = group_size;
  s.sym = sym;
  s.mse = mse;
  s.mse_norm = mse_norm;
  s.mse_grid = mse_grid;
  s.mse_maxshrink = mse_maxshrink;
  return s;
}

py::dict result_dict(QuantResult&& r) {
  auto owner = std::make_shared<QuantResult>(std::move(r));
  py::dict d;
  d["Q"] = export_matrix(owner, owner->Q);
  d["codes"] = export_matrix(owner, owner->codes);
  d["scales"] = export_matrix(owner, owner->scales);
  d["zeros"] = export_matrix(owner, owner->zeros);
  d["g_idx"] = export_vector(owner, owner->g_idx);
  d["perm"] = owner->perm.empty() ? py::object(py::none()) : py::cast(export_vector(owner, owner->perm));
  d["loss"] = owner->loss;
  d["percdamp"] = owner->percdamp;
  d["fell_back_to_rtn"] = owner->fell_back_to_rtn;
  d["method"] = owner->method;
  return d;
}

template <typename Acc>
void bind_hessian(py::module_& m, const char* name) {
  using H = HessianAccumulator<Acc>;
  py::class_<H, std::shared_ptr<H>>(m, name)
      .def(py::init<std::int64_t>(), py::arg("columns"))
      .def(
          "add_batch",
          [](H& self, const py::handle& X) {
            DLPackTensor x = import_tensor(X, "X");
            py::gil_scoped_release release;
            self.add_batch(x.view());
          },
          py::arg("X"), "Add activations X [..., columns] (float32/float64/float16/bfloat16, CPU).")
      .def_property_readonly("columns", &H::columns)
      .def_property_readonly("nsamples", &H::nsamples)
      .def(
          "hessian",
          [](const std::shared_ptr<H>& self) {
            const auto& M = self->hessian();
            return export_matrix(std::static_pointer_cast<void>(self), M);
          },
          "The symmetric Hessian [columns, columns]; shares memory with the accumulator.")
      .def("reset", &H::reset);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "normtweak C++ core (quantizers, Hessian accumulation, GPTQ packing)";
  m.attr("__version__") = NORMTWEAK_VERSION_STRING;

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const error& e) {
      if (e.code() == errc::invalid_argument)
        PyErr_SetString(PyExc_ValueError, e.what());
      else
        PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  m.def("set_num_threads", &set_num_threads, py::arg("n"), "Threads for normtweak's CPU work (OpenMP loops and BLAS).");
  m.def("num_threads", &num_threads);
  m.def(
      "set_log_handler",
      [](py::object fn) {
        if (fn.is_none()) {
          set_log_handler({});
          return;
        }
        set_log_handler([fn](log_level level, const std::string& msg) {
          py::gil_scoped_acquire gil;
          fn(static_cast<int>(level), msg);
        });
      },
      py::arg("handler"), "handler(level: int, message: str); None restores printing to stderr.");

  py::class_<DLPackArray>(m, "DLPackArray")
      .def("__dlpack__", &DLPackArray::dlpack)
      .def("__dlpack_device__", &DLPackArray::device)
      .def_property_readonly("shape", &DLPackArray::shape)
      .def_property_readonly("dtype", &DLPackArray::dtype_str);

  m.def(
      "rtn_quantize",
      [](const py::handle& W, int bits, int group_size, bool sym, bool mse, float mse_norm, int mse_grid,
         float mse_maxshrink, const std::string& name) {
        DLPackTensor w = import_tensor(W, "W");
        Quantizer<RTN> q(make_spec(bits, group_size, sym, mse, mse_norm, mse_grid, mse_maxshrink), RTN::config{name});
        QuantResult r;
        {
          py::gil_scoped_release release;
          r = q.quantize(w.view());
        }
        return result_dict(std::move(r));
      },
      py::arg("W"), py::arg("bits") = 4, py::arg("group_size") = -1, py::arg("sym") = true, py::arg("mse") = false,
      py::arg("mse_norm") = 2.4f, py::arg("mse_grid") = 100, py::arg("mse_maxshrink") = 0.8f, py::arg("name") = "",
      "Round-to-nearest quantization of W [out, in].");

  m.def(
      "gptq_quantize",
      [](const py::handle& W, const py::handle& H, int bits, int group_size, bool sym, bool mse, float mse_norm,
         int mse_grid, float mse_maxshrink, int blocksize, double percdamp, bool act_order, bool static_groups,
         int damp_retries, const std::string& name) {
        DLPackTensor w = import_tensor(W, "W");
        DLPackTensor h = import_tensor(H, "H");
        GPTQ::config cfg;
        cfg.blocksize = blocksize;
        cfg.percdamp = percdamp;
        cfg.act_order = act_order;
        cfg.static_groups = static_groups;
        cfg.damp_retries = damp_retries;
        cfg.layer_name = name;
        Quantizer<GPTQ> q(make_spec(bits, group_size, sym, mse, mse_norm, mse_grid, mse_maxshrink), cfg);
        QuantResult r;
        {
          py::gil_scoped_release release;
          r = q.quantize(w.view(), h.view());
        }
        return result_dict(std::move(r));
      },
      py::arg("W"), py::arg("H"), py::arg("bits") = 4, py::arg("group_size") = -1, py::arg("sym") = true,
      py::arg("mse") = false, py::arg("mse_norm") = 2.4f, py::arg("mse_grid") = 100, py::arg("mse_maxshrink") = 0.8f,
      py::arg("blocksize") = 128, py::arg("percdamp") = 0.01, py::arg("act_order") = false,
      py::arg("static_groups") = false, py::arg("damp_retries") = 3, py::arg("name") = "",
      "GPTQ quantization of W [out, in] with Hessian H [in, in].");

  bind_hessian<float>(m, "HessianAccumulatorF32");
  bind_hessian<double>(m, "HessianAccumulatorF64");

  m.def(
      "pack_gptq",
      [](const py::handle& codes, const py::handle& scales, const py::handle& zeros, const py::handle& g_idx,
         int bits) {
        DLPackTensor c = import_tensor(codes, "codes"), s = import_tensor(scales, "scales"),
                     z = import_tensor(zeros, "zeros"), g = import_tensor(g_idx, "g_idx");
        auto p = std::make_shared<GPTQPacked>(pack_gptq(c.view(), s.view(), z.view(), g.view(), bits));
        py::dict d;
        d["qweight"] = export_matrix(p, p->qweight);
        d["qzeros"] = export_matrix(p, p->qzeros);
        d["scales"] = DLPackArray(TensorView(p->scales.data(), dtype::f16, {p->scales.rows(), p->scales.cols()}), p);
        d["g_idx"] = export_vector(p, p->g_idx);
        return d;
      },
      py::arg("codes"), py::arg("scales"), py::arg("zeros"), py::arg("g_idx"), py::arg("bits"),
      "Pack codes [out, in] uint8, scales/zeros [out, G] float32, g_idx [in] int32 into the gptq layout.");

  m.def(
      "unpack_gptq",
      [](const py::handle& qweight, const py::handle& qzeros, const py::handle& scales, const py::handle& g_idx,
         int bits) {
        DLPackTensor qw = import_tensor(qweight, "qweight"), qz = import_tensor(qzeros, "qzeros"),
                     s = import_tensor(scales, "scales"), g = import_tensor(g_idx, "g_idx");
        auto u = std::make_shared<GPTQUnpacked>(unpack_gptq(qw.view(), qz.view(), s.view(), g.view(), bits));
        py::dict d;
        d["codes"] = export_matrix(u, u->codes);
        d["scales"] = export_matrix(u, u->scales);
        d["zeros"] = export_matrix(u, u->zeros);
        d["g_idx"] = export_vector(u, u->g_idx);
        return d;
      },
      py::arg("qweight"), py::arg("qzeros"), py::arg("scales"), py::arg("g_idx"), py::arg("bits"),
      "Unpack a gptq-layout layer into codes [out, in], scales/zeros [out, G] float32 and g_idx.");
}
