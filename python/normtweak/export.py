"""Writing and reading quantized checkpoints.

* GPTQ format: per quantized Linear `qweight`, `qzeros`, `scales` (float16),
  `g_idx` (and `bias`), every other tensor as in the model, and a
  `quantization_config` in config.json (quant_method "gptq", bits, group_size,
  desc_act, sym, checkpoint_format "gptq"), the layout GPTQModel/AutoGPTQ write.
* Fake-quant format: the dequantized float weights via save_pretrained, which
  any transformers install can load, and a `quantization_config` with
  quant_method "normtweak-fake" that records the weight and activation
  schemes (transformers ignores it with a log line and loads the float
  weights; `load_quantized` re-attaches the simulated activation quantization).

Both are written into a temporary folder renamed into place when complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from . import core
from .models import get_adapter

WEIGHTS = "model.safetensors"


RESUME = "resume"  # per-block checkpoints of the run writing this folder (checkpoint.py)


def staging_dir(out: str | Path) -> Path:
    """Where the files of `out` are written before the rename; its `resume/` holds the run's checkpoints."""
    out = Path(out)
    return out.with_name(out.name + ".tmp")


def _atomic_dir(out: str | Path):
    out = Path(out)
    tmp = staging_dir(out)
    if tmp.exists():  # leftovers of an earlier attempt, but not its checkpoints
        for p in tmp.iterdir():
            if p.name != RESUME:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    tmp.mkdir(parents=True, exist_ok=True)
    return out, tmp


def _finish(tmp: Path, out: Path) -> None:
    shutil.rmtree(tmp / RESUME, ignore_errors=True)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def _act_bits(model) -> dict[str, int]:
    return {name: mod._normtweak_abits for name, mod in model.named_modules()
            if getattr(mod, "_normtweak_abits", 16) < 16}


def _act_config(model, abits: dict[str, int]) -> dict:
    """quantization_config["activations"]: bits, scheme, the modules, and the static scales if any."""
    scales = {name: model.get_submodule(name)._normtweak_act_scale for name in abits}
    static = any(v is not None for v in scales.values())
    if static and any(v is None for v in scales.values()):
        raise ValueError("the model mixes static and dynamic activation scales; quantize it with or without "
                         "--act-static throughout")
    acts = {"bits": sorted(set(abits.values()))[0],
            "scheme": "per-tensor static symmetric" if static else "per-token dynamic symmetric",
            "dynamic": not static, "modules": sorted(abits)}
    if static:
        acts["scales"] = {name: scales[name] for name in sorted(abits)}
    return acts


def save_fake(model, tokenizer, out: str | Path, extra: Optional[dict] = None) -> Path:
    out, tmp = _atomic_dir(out)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    cfg = json.loads((tmp / "config.json").read_text())
    quantized = list(_quantized_modules(model))
    abits = _act_bits(model)
    if quantized or abits:
        r0 = quantized[0][2] if quantized else None
        cfg["quantization_config"] = {
            "quant_method": "normtweak-fake",
            "weights": None if r0 is None else {"bits": r0.bits, "group_size": r0.group_size, "sym": r0.sym,
                                                 "method": r0.method},
            "activations": None if not abits else _act_config(model, abits),
        }
    if extra:
        cfg["normtweak"] = extra
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    _finish(tmp, out)
    return out


def _quantized_modules(model):
    for name, mod in model.named_modules():
        r = getattr(mod, "_normtweak_quant", None)
        if r is not None:
            yield name, mod, r


def save_gptq(model, tokenizer, out: str | Path, extra: Optional[dict] = None) -> Path:
    """Write `model` (quantized by normtweak.quantize) as a GPTQ-format checkpoint."""
    from safetensors.torch import save_file

    adapter = get_adapter(model)
    quantized = list(_quantized_modules(model))
    if not quantized:
        raise ValueError("the model has no normtweak-quantized layers; run normtweak.quantize first")
    if _act_bits(model):
        raise ValueError("the model quantizes activations (abits < 16), which the GPTQ format cannot record; "
                         "write it with --format fake (export.save_fake)")
    bits = {r.bits for _, _, r in quantized}
    groups = {r.group_size for _, _, r in quantized}
    if len(bits) != 1 or len(groups) != 1:
        raise ValueError(f"mixed bit widths {bits} or group sizes {groups} cannot share one quantization_config")
    tensors: dict[str, torch.Tensor] = {}
    qnames = set()
    for name, mod, r in quantized:
        p = core.pack_gptq(r)
        tensors[f"{name}.qweight"] = p.qweight.clone()
        tensors[f"{name}.qzeros"] = p.qzeros.clone()
        tensors[f"{name}.scales"] = p.scales.clone()
        tensors[f"{name}.g_idx"] = p.g_idx.clone()
        qnames.add(f"{name}.weight")
    seen = set()
    for k, v in model.state_dict().items():
        if k in qnames:
            continue
        if v.data_ptr() in seen:  # tied weights (lm_head = embed_tokens) are stored once
            continue
        seen.add(v.data_ptr())
        tensors[k] = v.detach().contiguous().clone()
    out, tmp = _atomic_dir(out)
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
    model.config.save_pretrained(tmp)
    cfg = json.loads((tmp / "config.json").read_text())
    r0 = quantized[0][2]
    cfg["quantization_config"] = {
        "quant_method": "gptq",
        "bits": r0.bits,
        "group_size": r0.group_size,
        "desc_act": r0.perm is not None,
        "sym": r0.sym,
        "checkpoint_format": "gptq",
        "true_sequential": True,
        "conv1d": adapter.conv1d,
    }
    if extra:
        cfg["normtweak"] = extra
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    _finish(tmp, out)
    return out


def load_quantized(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, packed) from a GPTQ-format or fake-quant folder; weights dequantized to float.

    `packed` maps each quantized Linear's name to its stored tensors (empty for fake-quant).
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").exists():
        raise ValueError(f"{path} has no config.json; not a model folder")
    raw = json.loads((path / "config.json").read_text())
    qcfg = raw.get("quantization_config")
    tok = AutoTokenizer.from_pretrained(str(path)) if (path / "tokenizer_config.json").exists() else None
    if qcfg is None or qcfg.get("quant_method") == "normtweak-fake":
        config = AutoConfig.from_pretrained(str(path))
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_pretrained(str(path), config=config, dtype=dtype)
        acts = (qcfg or {}).get("activations")
        if acts:
            from .smoothquant import attach_act_quant

            scales = acts.get("scales") or {}
            for name in acts["modules"]:
                attach_act_quant(model.get_submodule(name), int(acts["bits"]), scales.get(name))
        return model.eval(), tok, {}
    if qcfg.get("quant_method") != "gptq" or qcfg.get("checkpoint_format", "gptq") != "gptq":
        raise ValueError(f"{path}: quantization_config {qcfg} is not a gptq-format checkpoint")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} has no .safetensors weight files")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except Exception as e:
            raise ValueError(f"{f} could not be read as safetensors (truncated or corrupt?): {e}") from e
    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    bits = int(qcfg["bits"])
    packed = {}
    state = {}
    for k in list(tensors):
        if k.endswith(".qweight"):
            name = k[: -len(".qweight")]
            t = {s: tensors.pop(f"{name}.{s}") for s in ("qweight", "qzeros", "scales", "g_idx")}
            packed[name] = t
            u = core.unpack_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits)
            g = u["g_idx"].long()
            W = u["scales"][:, g] * (u["codes"].float() - u["zeros"][:, g])
            state[f"{name}.weight"] = W.t() if qcfg.get("conv1d") else W
    state.update(tensors)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the architecture (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    model.tie_weights()
    return model.eval(), tok, packed
