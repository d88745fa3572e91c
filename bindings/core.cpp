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
  d["smooth"] = owner->smooth.empty() ? py::object(py::none()) : py::cast(export_vector(owner, owner->smooth));
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

// NormTweaker plus the imported parameter tensors it updates in place (kept
// alive for as long as the tweaker refers to them).
struct PyNormTweaker {
  PyNormTweaker(TweakConfig c, int layers) : tweaker(c, layers) {}
  void begin_layer(int layer, const py::list& params) {
    held.clear();
    std::vector<TensorView> views;
    for (const auto& p : params) {
      held.push_back(import_tensor(p, "norm parameter"));
      views.push_back(held.back().view());
    }
    tweaker.begin_layer(layer, std::move(views));
  }
  void step(const py::list& grads) {
    std::vector<DLPackTensor> gs;
    std::vector<TensorView> views;
    for (const auto& g : grads) {
      gs.push_back(import_tensor(g, "gradient"));
      views.push_back(gs.back().view());
    }
    tweaker.step(views);
  }
  NormTweaker tweaker;
  std::vector<DLPackTensor> held;
};

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "normtweak C++ core (quantizers, Hessian accumulation, GPTQ packing)";
  m.attr("__version__") = NORMTWEAK_VERSION_STRING;
  {
    py::list names;
    for (const char* n : kDistLossNames) names.append(n);
    m.attr("LOSSES") = py::tuple(names);
    m.attr("RELDIST_VAR_FLOOR") = kRelDistVarFloor;
  }

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
      "has_cuda", [] { return cuda_backend_slot() != nullptr; },
      "Whether this module was built with the CUDA back-end (CMake option NORMTWEAK_PYTHON_CUDA).");
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
         float mse_maxshrink, const std::string& name, std::uintptr_t stream) {
        DLPackTensor w = import_tensor(W, "W");
        Quantizer<RTN> q(make_spec(bits, group_size, sym, mse, mse_norm, mse_grid, mse_maxshrink), RTN::config{name});
        QuantResult r;
        {
          py::gil_scoped_release release;
          CudaStreamScope on(reinterpret_cast<void*>(stream));
          r = q.quantize(w.view());
        }
        return result_dict(std::move(r));
      },
      py::arg("W"), py::arg("bits") = 4, py::arg("group_size") = -1, py::arg("sym") = true, py::arg("mse") = false,
      py::arg("mse_norm") = 2.4f, py::arg("mse_grid") = 100, py::arg("mse_maxshrink") = 0.8f, py::arg("name") = "",
      py::arg("stream") = 0, "Round-to-nearest quantization of W [out, in]; CUDA tensors run on `stream`.");

  py::class_<ActAbsMax, std::shared_ptr<ActAbsMax>>(m, "ActAbsMax")
      .def(py::init<std::int64_t>(), py::arg("channels"))
      .def(
          "add_batch",
          [](ActAbsMax& self, const py::handle& X) {
            DLPackTensor x = import_tensor(X, "X");
            py::gil_scoped_release release;
            self.add_batch(x.view());
          },
          py::arg("X"), "Fold activations X [..., channels] into the per-channel running max |x|.")
      .def_property_readonly("channels", &ActAbsMax::channels)
      .def_property_readonly("tokens", &ActAbsMax::tokens)
      .def(
          "absmax",
          [](const std::shared_ptr<ActAbsMax>& self) {
            return export_vector(std::static_pointer_cast<void>(self), self->absmax());
          },
          "Per-channel max |x| [channels] float32; shares memory with the accumulator.")
      .def("reset", &ActAbsMax::reset);

  m.def(
      "smooth_factors",
      [](const py::handle& act_absmax, const py::list& weights, float alpha) {
        DLPackTensor a = import_tensor(act_absmax, "act_absmax");
        std::vector<DLPackTensor> ws;
        std::vector<TensorView> views;
        for (const auto& w : weights) ws.push_back(import_tensor(w, "W"));
        for (const auto& w : ws) views.push_back(w.view());
        auto s = std::make_shared<std::vector<float>>();
        {
          py::gil_scoped_release release;
          *s = smooth_factors(a.view(), views, alpha);
        }
        return export_vector(std::static_pointer_cast<void>(s), *s);
      },
      py::arg("act_absmax"), py::arg("weights"), py::arg("alpha") = 0.5f,
      "SmoothQuant factors s [in] (paper eq. 4) shared by every W [out_k, in] that reads the smoothed input.");

  m.def(
      "smoothquant_quantize",
      [](const py::handle& W, const py::handle& S, int bits, int group_size, bool sym, const std::string& name) {
        DLPackTensor w = import_tensor(W, "W");
        DLPackTensor sv = import_tensor(S, "s");
        QuantSpec spec = make_spec(bits, group_size, sym, false, 2.4f, 100, 0.8f);
        Quantizer<SmoothQuant> q(spec, SmoothQuant::config{name});
        QuantResult r;
        {
          py::gil_scoped_release release;
          r = q.quantize(w.view(), sv.view());
        }
        return result_dict(std::move(r));
      },
      py::arg("W"), py::arg("s"), py::arg("bits") = 8, py::arg("group_size") = -1, py::arg("sym") = true,
      py::arg("name") = "", "RTN quantization of W diag(s) [out, in]; the result's smooth is s.");

  m.def(
      "gptq_quantize",
      [](const py::handle& W, const py::handle& H, int bits, int group_size, bool sym, bool mse, float mse_norm,
         int mse_grid, float mse_maxshrink, int blocksize, double percdamp, bool act_order, bool static_groups,
         int damp_retries, const std::string& name, std::uintptr_t stream) {
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
          CudaStreamScope on(reinterpret_cast<void*>(stream));
          r = q.quantize(w.view(), h.view());
        }
        return result_dict(std::move(r));
      },
      py::arg("W"), py::arg("H"), py::arg("bits") = 4, py::arg("group_size") = -1, py::arg("sym") = true,
      py::arg("mse") = false, py::arg("mse_norm") = 2.4f, py::arg("mse_grid") = 100, py::arg("mse_maxshrink") = 0.8f,
      py::arg("blocksize") = 128, py::arg("percdamp") = 0.01, py::arg("act_order") = false,
      py::arg("static_groups") = false, py::arg("damp_retries") = 3, py::arg("name") = "", py::arg("stream") = 0,
      "GPTQ quantization of W [out, in] with Hessian H [in, in]; CUDA tensors run on `stream` (a cudaStream_t "
      "as an integer, 0 = default stream).");


  m.def(
      "channel_dist_loss",
      [](const py::handle& f, const py::handle& q, const std::string& kind, const py::object& grad_q,
         std::uintptr_t stream) {
        DLPackTensor ft = import_tensor(f, "f"), qt = import_tensor(q, "q");
        DLPackTensor gt;
        const bool with_grad = !grad_q.is_none();
        if (with_grad) gt = import_tensor(grad_q, "grad_q");
        const DistLoss k = dist_loss_from_string(kind);
        py::gil_scoped_release release;
        CudaStreamScope on(reinterpret_cast<void*>(stream));
        return channel_dist_loss(ft.view(), qt.view(), k, with_grad ? &gt.view() : nullptr);
      },
      py::arg("f"), py::arg("q"), py::arg("kind") = "dist", py::arg("grad_q") = py::none(), py::arg("stream") = 0,
      "Norm Tweaking loss between float output f and quantized output q [..., C]; writes dL/dq into grad_q "
      "(float32, same number of elements) when given.");

  auto make_norm_spec = [](const std::string& kind, float eps, bool unit_offset) {
    NormSpec spec;
    if (kind == "rms")
      spec.kind = NormSpec::Kind::rms;
    else if (kind == "layer")
      spec.kind = NormSpec::Kind::layer;
    else
      throw error(errc::invalid_argument, fmt::format("norm kind='{}' is not 'rms' or 'layer'", kind));
    spec.eps = eps;
    spec.unit_offset = unit_offset;
    return spec;
  };
  m.def(
      "norm_forward",
      [make_norm_spec](const std::string& kind, float eps, bool unit_offset, const py::handle& x, const py::handle& w,
                       const py::object& b, const py::handle& y, const py::handle& rstd, const py::object& mean,
                       std::uintptr_t stream) {
        const NormSpec spec = make_norm_spec(kind, eps, unit_offset);
        DLPackTensor xt = import_tensor(x, "x"), wt = import_tensor(w, "weight"), yt = import_tensor(y, "y"),
                     rt = import_tensor(rstd, "rstd");
        DLPackTensor bt, mt;
        if (!b.is_none()) bt = import_tensor(b, "bias");
        if (!mean.is_none()) mt = import_tensor(mean, "mean");
        py::gil_scoped_release release;
        CudaStreamScope on(reinterpret_cast<void*>(stream));
        norm_forward(spec, xt.view(), wt.view(), b.is_none() ? nullptr : &bt.view(), yt.view(), rt.view(),
                     mean.is_none() ? nullptr : &mt.view());
      },
      py::arg("kind"), py::arg("eps"), py::arg("unit_offset"), py::arg("x"), py::arg("weight"), py::arg("bias"),
      py::arg("y"), py::arg("rstd"), py::arg("mean"), py::arg("stream") = 0);
  m.def(
      "norm_backward",
      [make_norm_spec](const std::string& kind, float eps, bool unit_offset, const py::handle& x, const py::handle& w,
                       const py::handle& dy, const py::handle& rstd, const py::object& mean, const py::handle& dx,
                       const py::handle& dw, const py::object& db, std::uintptr_t stream) {
        const NormSpec spec = make_norm_spec(kind, eps, unit_offset);
        DLPackTensor xt = import_tensor(x, "x"), wt = import_tensor(w, "weight"), dyt = import_tensor(dy, "dy"),
                     rt = import_tensor(rstd, "rstd"), dxt = import_tensor(dx, "dx"), dwt = import_tensor(dw, "dw");
        DLPackTensor mt, dbt;
        if (!mean.is_none()) mt = import_tensor(mean, "mean");
        if (!db.is_none()) dbt = import_tensor(db, "db");
        py::gil_scoped_release release;
        CudaStreamScope on(reinterpret_cast<void*>(stream));
        norm_backward(spec, xt.view(), wt.view(), dyt.view(), rt.view(), mean.is_none() ? nullptr : &mt.view(),
                      dxt.view(), dwt.view(), db.is_none() ? nullptr : &dbt.view());
      },
      py::arg("kind"), py::arg("eps"), py::arg("unit_offset"), py::arg("x"), py::arg("weight"), py::arg("dy"),
      py::arg("rstd"), py::arg("mean"), py::arg("dx"), py::arg("dw"), py::arg("db"), py::arg("stream") = 0);

  py::class_<PyNormTweaker>(m, "NormTweaker")
      .def(py::init([](double lr0, double scale, int passes, int num_layers, double beta1, double beta2, double eps) {
             TweakConfig c;
             c.lr0 = lr0;
             c.scale = scale;
             c.passes = passes;
             c.beta1 = beta1;
             c.beta2 = beta2;
             c.adam_eps = eps;
             return new PyNormTweaker(c, num_layers);
           }),
           py::arg("lr0"), py::arg("scale"), py::arg("passes"), py::arg("num_layers"), py::arg("beta1") = 0.9,
           py::arg("beta2") = 0.999, py::arg("eps") = 1e-8)
      .def("lr", [](const PyNormTweaker& t, int layer) { return t.tweaker.lr(layer); })
      .def("begin_layer", &PyNormTweaker::begin_layer, py::arg("layer"), py::arg("params"),
           "Train these float32 parameters (updated in place) with Adam at lr(layer).")
      .def("step", &PyNormTweaker::step, py::arg("grads"))
      .def_property_readonly("steps", [](const PyNormTweaker& t) { return t.tweaker.steps(); });

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
