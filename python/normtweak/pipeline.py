"""The block walker: quantize a decoder-only HF model block by block (GPTQ or
RTN) and tweak each block's norms (Norm Tweaking, Algorithm 1).

For block l with input X_l (the quantized model's activations so far):
  1. fOut_l = float block(X_l)
  2. quantize the block's Linear layers in true-sequential groups, each with
     Hessians gathered by forward hooks on the current (partly quantized) block
  3. tweak the norms so the channel statistics of block(X_l) match fOut_l
  4. X_{l+1} = quantized block(X_l)
One block and the calibration activations are in memory at a time.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Optional, Sequence

import torch

from . import core
from .models import (Adapter, all_norms, block_norms, blocks, final_norm, get_adapter, get_module, head_logits, linear_weight,
                     set_linear_weight)
from .tweak import TweakConfig, _StopForward, kl_steps, run_block, run_watching_inputs, tweak_block, tweak_norms_kl

log = logging.getLogger("normtweak")


@dataclass
class GPTQConfig:
    """Quantization settings.

    method: "gptq", "rtn", or "smoothquant" (smooth each block's norm -> Linear
        pairs and, where the architecture allows, its v_proj -> o_proj and
        up_proj -> down_proj pairs, then quantize the weights with `weight_method`).
    abits: activation bits, simulated per token (dynamic, symmetric) on the
        input of every quantized Linear; 16 keeps activations in float.
    act_static: one static per-tensor activation scale per Linear, from the
        maximum |x| of its input over the calibration tokens (after the block's
        weights are quantized), instead of dynamic per-token scales.
    alpha: SmoothQuant's migration strength in [0, 1]; None searches it per
        pair over smoothquant.ALPHA_GRID, and leaving the pair unsmoothed, by
        the pair's output error.
    smooth_linear: also smooth the Linear -> Linear pairs (v_proj -> o_proj,
        up_proj -> down_proj). None: only where the activations are quantized
        at most as finely as the weights (abits <= bits, e.g. W8A8, W4A4):
        moving activation outliers into o_proj/down_proj weights pays off
        when activation error dominates and costs more than it saves when the
        weights are the narrower side (W4A8; measured in docs/findings.md).
    weight_method: the weight quantizer under SmoothQuant, "rtn" or "gptq"
        (GPTQ then runs on the smoothed weights with Hessians of the smoothed inputs).
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    static_groups: bool = False
    percdamp: float = 0.01
    blocksize: int = 128
    mse: bool = False
    method: str = "gptq"
    abits: int = 16
    alpha: Optional[float] = 0.5
    weight_method: str = "rtn"
    act_static: bool = False
    smooth_linear: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.method not in ("gptq", "rtn", "smoothquant"):
            raise ValueError(f"method={self.method!r} is not 'gptq', 'rtn' or 'smoothquant' (--method)")
        if self.weight_method not in ("gptq", "rtn"):
            raise ValueError(f"weight_method={self.weight_method!r} is not 'gptq' or 'rtn' (--weight-method)")
        if self.abits != 16 and not 4 <= self.abits <= 8:
            raise ValueError(f"abits={self.abits} is not supported; choose 4..8, or 16 for float activations (--abits)")
        if self.act_static and self.abits >= 16:
            raise ValueError("act_static=True sets static activation scales, but abits=16 keeps activations in "
                             "float; add --abits 8 (or 4) or drop --act-static")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"SmoothQuant alpha={self.alpha} must lie in [0, 1] (--alpha)")
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits={self.bits} is not supported; choose 2..8 (--wbits)")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size={self.group_size} must be -1 or positive (--group-size)")

    @property
    def smooths_linear_pairs(self) -> bool:
        """Whether SmoothQuant smooths the Linear -> Linear pairs (see smooth_linear)."""
        return self.abits <= self.bits if self.smooth_linear is None else self.smooth_linear

    @property
    def weights(self) -> str:
        """The weight quantizer that runs: "gptq" or "rtn"."""
        return self.weight_method if self.method == "smoothquant" else self.method


@dataclass
class BlockStats:
    index: int
    delta_mu: float  # mean_c |mu_f - mu_q| of the block output
    delta_var: float  # mean_c |var_f - var_q|
    delta_mu_before_tweak: float
    delta_var_before_tweak: float
    tweak: Optional[dict] = None
    fallbacks: list = field(default_factory=list)
    seconds: float = 0.0
    smoothing: list = field(default_factory=list)


@dataclass
class QuantizeReport:
    config: dict
    tweak: Optional[dict]
    blocks: list
    seconds: float
    layers_quantized: int
    lr_search: Optional[dict] = None
    kl_tweak: Optional[dict] = None  # tweak_norms_kl's stats when TweakConfig.kl_norms is not "off"


CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")  # "cache": transformers >= 5.24


@torch.no_grad()
def capture_block_inputs(model, calib: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
    """Inputs of the first block for every calibration sample, and its keyword arguments."""
    first = blocks(model)[0]
    inputs: list[torch.Tensor] = []
    kwargs: dict = {}

    def hook(mod, args, kw):
        x = args[0] if args else kw.pop("hidden_states")
        inputs.append(x.detach())
        if not kwargs:
            kwargs.update({k: v for k, v in kw.items() if k not in ("hidden_states",)})
        raise _StopForward

    h = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(calib.shape[0]):
            try:
                model(input_ids=calib[i : i + 1], use_cache=False)
            except _StopForward:
                pass
    finally:
        h.remove()
    from transformers.cache_utils import Cache

    # the blocks run one at a time on whole samples: no key/value cache, whatever the architecture names it
    for k in [k for k, v in kwargs.items() if isinstance(v, Cache) or k in CACHE_KWARGS]:
        del kwargs[k]
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return inputs, kwargs


@torch.no_grad()
def channel_moments(xs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and variance (population) over every token of `xs` (each [..., C]), in float64, one
    tensor at a time: no float64 copy of all the tokens at once."""
    C = xs[0].shape[-1]
    n = sum(x.numel() // C for x in xs)
    mean = sum(x.reshape(-1, C).double().sum(0) for x in xs) / n
    var = sum(((x.reshape(-1, C).double() - mean) ** 2).sum(0) for x in xs) / n
    return mean, var


def stats_gap(f: tuple[torch.Tensor, torch.Tensor], q: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    """Figure 1's quantities from two channel_moments: mean over channels of |mu_f - mu_q| and |var_f - var_q|."""
    return (f[0] - q[0]).abs().mean().item(), (f[1] - q[1]).abs().mean().item()


def _check_group_size(cfg: GPTQConfig, W: torch.Tensor, lname: str) -> None:
    if cfg.group_size > W.shape[1]:
        raise ValueError(
            f"group_size={cfg.group_size} is larger than layer {lname!r} (in_features={W.shape[1]}); "
            f"use --group-size {W.shape[1]} or smaller, or -1 for one group per output channel"
        )


def _quantize_group(block, adapter: Adapter, names, inputs, kwargs, cfg: GPTQConfig, prefix: str, fallbacks: list):
    mods = {name: get_module(block, name) for name in names}
    for name, mod in mods.items():
        _check_group_size(cfg, linear_weight(mod, adapter), f"{prefix}.{name}")
    accs = {}
    if cfg.weights == "gptq":
        watchers = {}
        for name, mod in mods.items():
            accs[name] = core.HessianAccumulator(linear_weight(mod, adapter).shape[1])

            def watch(x, _acc=accs[name], _name=f"{prefix}.{name}"):
                try:
                    _acc.add_batch(x.reshape(-1, x.shape[-1]))
                except ValueError as e:
                    raise ValueError(f"input of layer {_name!r}: {e}") from None

            watchers[name] = watch
        run_watching_inputs(block, watchers, inputs, kwargs)
    for name, mod in mods.items():
        W = linear_weight(mod, adapter).float()
        lname = f"{prefix}.{name}"
        if cfg.weights == "gptq":
            r = core.gptq_quantize(
                W,
                accs[name].hessian(),
                bits=cfg.bits,
                group_size=cfg.group_size,
                sym=cfg.sym,
                mse=cfg.mse,
                blocksize=cfg.blocksize,
                percdamp=cfg.percdamp,
                act_order=cfg.act_order,
                static_groups=cfg.static_groups,
                name=lname,
            )
            if r.fell_back_to_rtn:
                fallbacks.append(lname)
        else:
            r = core.rtn_quantize(W, bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, mse=cfg.mse, name=lname)
        set_linear_weight(mod, r.Q, adapter)
        # Keep what export needs (codes, scales, zeros, g_idx), not a second float copy of the weights.
        r.Q = None
        mod._normtweak_quant = r


def quantize(
    model,
    calib: torch.Tensor,
    config: GPTQConfig = GPTQConfig(),
    tweak: Optional[TweakConfig] = None,
    progress: bool = True,
    float_model=None,
    checkpoint: Optional[str] = None,
    resume: bool = False,
    block_stats: bool = True,
) -> QuantizeReport:
    """Quantize `model` in place; tweak its norms when `tweak` is given.

    calib: [n, seqlen] token ids (see calibration.py).
    float_model: post-step mode — `model` is already quantized; the float
        targets come from the same blocks of `float_model` and no weight is
        quantized again.
    checkpoint: a folder for per-block checkpoints (checkpoint.py); with
        `resume`, the blocks completed there are restored instead of redone.
    block_stats: Figure 1's per-block gaps (BlockStats.delta_*). Without a tweak they cost one more forward of
        every float block (about a fifth of GPTQ's time on SmolLM2-135M); False skips it and leaves them NaN.
    """
    from tqdm.auto import tqdm

    if tweak is not None and tweak.order == "after" and float_model is None and not tweak.lr_grid:
        if checkpoint is not None:
            raise ValueError("per-block checkpoints (--resume) cover the in-walk order only; use --tweak-order "
                             "walk or --no-checkpoint")
        return _quantize_then_tweak(model, calib, config, tweak, progress)
    if tweak is not None and tweak.lr_grid:
        if checkpoint is not None:
            raise ValueError("per-block checkpoints (--resume) do not cover the learning-rate search; give one "
                             "--tweak-lr value")
        return _quantize_with_lr_search(model, calib, config, tweak, progress, float_model)
    adapter = get_adapter(model)
    if float_model is not None and get_adapter(float_model) != adapter:
        raise ValueError("the float and quantized models have different architectures")
    layers = blocks(model)
    flayers = blocks(float_model) if float_model is not None else None
    if flayers is not None and len(flayers) != len(layers):
        raise ValueError(f"float model has {len(flayers)} blocks but the quantized model has {len(layers)}")
    t_start = time.perf_counter()
    inputs, kwargs = capture_block_inputs(model, calib)
    L = len(layers)
    stats: list[BlockStats] = []
    start = 0
    # target="float" and the KL stage: the float model's own activations, carried through the float blocks beside
    # the quantized ones
    kl_stage = tweak is not None and tweak.kl_norms != "off"
    finputs = inputs if tweak is not None and (tweak.target == "float" or kl_stage) else None
    # the final norm's float twin, taken before anything is tweaked (in the walk, `model` is the float model so far)
    float_ref = model if float_model is None else float_model
    fnorm = copy.deepcopy(final_norm(float_ref).module) if kl_stage else None
    ckpt = None
    if checkpoint is not None:
        from .checkpoint import BlockCheckpoint, fingerprint

        ckpt = BlockCheckpoint(checkpoint, fingerprint(model, calib, config, tweak))
        ckpt.start(resume)
        if resume:
            start, restored_inputs, restored, restored_float = ckpt.restore(layers)
            if start:
                inputs, finputs = restored_inputs, restored_float
                stats = [BlockStats(**d) for d in restored]
    bar = tqdm(total=L, initial=start, desc="quantizing blocks", unit="block", disable=not progress)
    prefix_root = adapter.layers
    for i, block in enumerate(layers):
        if i < start:
            continue
        t0 = time.perf_counter()
        ref_block = flayers[i] if flayers is not None else block
        if flayers is not None:
            for a, b in zip(block_norms(ref_block, adapter), block_norms(block, adapter)):
                if a.module.weight.shape != b.module.weight.shape:
                    raise ValueError(f"block {i}: norm {a.name} shapes differ between float and quantized models")
        # fOut_l on the quantized model's activations (Algorithm 1); with passes 0 nothing is tweaked toward it, and
        # Figure 1's statistics compare with the float path's own outputs instead of running the block once more
        local = block_stats if tweak is None else tweak.target == "local" and tweak.passes > 0
        targets = run_block(ref_block, inputs, kwargs) if local else None
        fnext = run_block(ref_block, finputs, kwargs) if finputs is not None else None  # the float path's next input
        if targets is None:
            targets = fnext  # fOut_l on the float model's activations
        fallbacks: list = []
        smoothing: list = []
        if float_model is None:
            if config.method == "smoothquant":
                from .smoothquant import smooth_block

                smoothing = smooth_block(block, adapter, block_norms(block, adapter), inputs, kwargs,
                                         alpha=config.alpha, wbits=config.bits, group_size=config.group_size,
                                         linear_pairs=config.smooths_linear_pairs,
                                         sym=config.sym, abits=config.abits, prefix=f"{prefix_root}.{i}")
            for names in adapter.groups:
                _quantize_group(block, adapter, names, inputs, kwargs, config, f"{prefix_root}.{i}", fallbacks)
            if config.abits < 16:
                from .smoothquant import attach_act_quant, static_act_scales

                names = [n for group in adapter.groups for n in group]
                scales = (static_act_scales(block, names, inputs, kwargs, config.abits) if config.act_static
                          else dict.fromkeys(names))
                for name in names:
                    attach_act_quant(get_module(block, name), config.abits, scales[name])
        outs = run_block(block, inputs, kwargs)
        fstats = channel_moments(targets) if targets is not None else None
        dmu0, dvar0 = stats_gap(fstats, channel_moments(outs)) if fstats is not None else (math.nan, math.nan)
        tstats = None
        if tweak is not None and tweak.passes > 0:  # passes 0: the KL stage alone
            tstats = tweak_block(block, block_norms(block, adapter), inputs, targets, kwargs, tweak, i, L, outputs=outs)
            judged = tstats.pop("outputs", None)  # the judge's run of the block as tweaked, when it saw every input
            outs = judged if judged is not None else run_block(block, inputs, kwargs)
        dmu, dvar = stats_gap(fstats, channel_moments(outs)) if tstats is not None else (dmu0, dvar0)
        stats.append(BlockStats(i, dmu, dvar, dmu0, dvar0, tstats, fallbacks, time.perf_counter() - t0, smoothing))
        inputs = outs
        if finputs is not None:
            finputs = fnext
        if ckpt is not None:
            ckpt.save_block(i, block, asdict(stats[-1]), inputs, finputs)
        if not math.isnan(dmu):  # block_stats=False leaves no gap to show
            bar.set_postfix(dmu=f"{dmu:.3g}", dvar=f"{dvar:.3g}")
        bar.update(1)
        del targets, fnext
    bar.close()
    kl_stats = None
    if kl_stage:
        kl_stats = _kl_stage(model, calib, float_ref, fnorm, inputs, finputs, tweak, progress)
    return QuantizeReport(
        config=asdict(config),
        tweak=asdict(tweak) if tweak else None,
        blocks=[asdict(s) for s in stats],
        seconds=time.perf_counter() - t_start,
        layers_quantized=0 if float_model is not None else L * sum(len(g) for g in adapter.groups),
        kl_tweak=kl_stats,
    )


def _kl_stage(model, calib, float_ref, fnorm: torch.nn.Module, inputs, finputs, tweak: TweakConfig,
              progress: bool) -> dict:
    """TweakConfig.kl_norms: the final norm ("final") or every norm ("all") toward the float model's next-token
    distribution (tweak.py). The float logits come from the float path's last block outputs, so no float copy of
    the model is needed in the walk."""
    from tqdm.auto import tqdm

    norm = final_norm(model)

    def float_logits(idx: list[int]) -> torch.Tensor:
        return head_logits(float_ref, fnorm(torch.cat([finputs[j] for j in idx])))

    def walked_logits(idx: list[int]) -> torch.Tensor:  # through the final norm alone, from the walk's last outputs
        return head_logits(model, norm.module(torch.cat([inputs[j] for j in idx])))

    if tweak.kl_norms == "final":
        norms = [norm]
        quant_logits = walked_logits
    else:
        norms = all_norms(model)  # ends with `norm`

        def quant_logits(idx: list[int]) -> torch.Tensor:
            return model(input_ids=calib[idx], use_cache=False).logits

    steps = kl_steps(len(inputs), tweak)
    desc = "KL tweak of the final norm" if tweak.kl_norms == "final" else f"KL tweak of all {len(norms)} norms"
    with tqdm(total=steps, desc=desc, unit="step", disable=not progress) as bar:
        out = tweak_norms_kl(norms, quant_logits, float_logits, len(inputs), tweak, frozen=model.parameters(),
                             progress=bar.update, logits_before=walked_logits)
    log.info("KL tweak (%s): next-token KL %.4g -> %.4g nats%s", tweak.kl_norms, out["loss_before"],
             out["loss_after"], " (rolled back)" if out["rolled_back"] else "")
    return out


def _take_quantization_stats(tweak_blocks: list[dict], quant_blocks: list[dict]) -> None:
    """A post-step tweak walk's block reports take the quantizing walk's fallbacks and pre-tweak gaps."""
    for b, q in zip(tweak_blocks, quant_blocks, strict=True):
        b["fallbacks"] = q["fallbacks"]
        b["delta_mu_before_tweak"], b["delta_var_before_tweak"] = q["delta_mu_before_tweak"], q["delta_var_before_tweak"]


def _quantize_then_tweak(model, calib, config: GPTQConfig, tweak: TweakConfig, progress: bool):
    """tweak.order == "after": quantize every block, then one post-step tweak walk against a float copy."""
    t0 = time.perf_counter()
    log.info("tweak order 'after': keeping a float copy of the model for the tweak targets")
    ref = copy.deepcopy(model)
    qrep = quantize(model, calib, config, None, progress=progress)
    trep = quantize(model, calib, config, tweak, progress=progress, float_model=ref)
    del ref
    _take_quantization_stats(trep.blocks, qrep.blocks)
    return QuantizeReport(
        config=asdict(config),
        tweak=asdict(tweak),
        blocks=trep.blocks,
        seconds=time.perf_counter() - t0,
        layers_quantized=qrep.layers_quantized,
        kl_tweak=trep.kl_tweak,
    )


def _quantize_with_lr_search(model, calib, config: GPTQConfig, tweak: TweakConfig, progress: bool, float_model):
    """Quantize without tweaking, then tweak with the lr0 of `tweak.lr_grid` that wins on held-out samples.

    The tweak walks run post-step (the weights are quantized before any norm is
    tweaked), so unlike Algorithm 1 the GPTQ of block l does not see the tweaked
    blocks before it.
    """
    from .search import search_lr, split_holdout

    t0 = time.perf_counter()
    holdout = tweak.holdout or 0.125
    train, _ = split_holdout(calib, holdout)
    qrep = None
    ref = float_model
    if ref is None:
        log.info("lr search: keeping a float copy of the model for the tweak targets")
        ref = copy.deepcopy(model)
        qrep = quantize(model, train, config, None, progress=progress)
    search, trep = search_lr(ref, model, calib, replace(tweak, holdout=0.0), tweak.lr_grid, holdout, progress)
    if trep is None:  # nothing beat the untweaked model: the stats of the untweaked walk
        trep = quantize(model, train, config, None, progress=False, float_model=ref)
    del ref
    blocks_ = trep.blocks
    if qrep is not None:
        _take_quantization_stats(blocks_, qrep.blocks)
    return QuantizeReport(
        config=asdict(config),
        tweak={**asdict(tweak), "lr": search.lr},
        blocks=blocks_,
        seconds=time.perf_counter() - t0,
        layers_quantized=qrep.layers_quantized if qrep else 0,
        lr_search=asdict(search),
        kl_tweak=trep.kl_tweak,
    )
