"""SmoothQuant (Xiao et al. 2023, arXiv 2211.10438) and simulated activation
quantization for the block walker.

For each decoder block, the two (norm -> Linear layers) pairs every adapter
has (the attention input norm before the query/key/value projections, the MLP
input norm before the MLP's input projections) are smoothed: the per-channel
maxima of the norm's output are gathered over the calibration tokens (in C++,
`ActAbsMax`), the factors s = max|X|^alpha / max|W|^(1 - alpha) (paper eq. 4)
computed over all Linear layers that read that output, and 1/s folded into the
norm's weight and bias while the Linear weights take s. Where there is no norm
in front of a Linear layer, the previous Linear layer takes 1/s on its output
rows instead (the adapter's `linear_pairs`: attention values -> output
projection, whose factors are shared by the query heads of a key/value group;
a gated MLP's up -> down projection). The float block is
unchanged by this (up to float rounding); only its quantization sees flatter
activations. alpha is fixed or searched per pair over a small grid, by the
output error of the pair's Linear layers on the calibration tokens with their
weights and activations quantized.

Activation quantization is simulated: a forward pre-hook on each quantized
Linear replaces its input by per-token dynamic symmetric fake-quantized values
(`abits` bits; the scale of each token is max|x| / (2^(abits-1) - 1)), or, with
static scales, by per-tensor values on one fixed scale max|x| / (2^(abits-1) - 1)
taken over the calibration tokens (values beyond it clip). Its
backward is the straight-through estimator, so Norm Tweaking's gradient reaches
the norms through it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from . import core
from .models import Adapter, get_module, linear_weight, set_linear_weight
from .tweak import NormInfo, run_watching_inputs

log = logging.getLogger("normtweak")

ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def fake_quant_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-token (last dimension) dynamic fake quantization; straight-through backward."""
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True).clamp_min(1e-8) / qmax
    q = (torch.round(xf / scale).clamp(-qmax - 1, qmax) * scale).to(x.dtype)
    return x + (q - x).detach()


def fake_quant_static(x: torch.Tensor, bits: int, scale: float) -> torch.Tensor:
    """Symmetric per-tensor fake quantization with a fixed scale (from calibration); values beyond the grid clip;
    straight-through backward."""
    qmax = 2 ** (bits - 1) - 1
    q = (torch.round(x.float() / scale).clamp(-qmax - 1, qmax) * scale).to(x.dtype)
    return x + (q - x).detach()


def _act_hook(bits: int, scale: Optional[float]):
    def hook(mod, args):
        x = fake_quant_per_token(args[0], bits) if scale is None else fake_quant_static(args[0], bits, scale)
        return (x,) + tuple(args[1:])

    return hook


def attach_act_quant(module: torch.nn.Module, bits: int, scale: Optional[float] = None) -> None:
    """Fake-quantize the input of `module` (a Linear or Conv1D) to `bits` bits from now on: per token with dynamic
    scales, or per tensor with the fixed `scale` (static, from calibration)."""
    if not 2 <= bits <= 16:
        raise ValueError(f"abits={bits} is not supported; choose 4..8, or 16 for float activations (--abits)")
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"static activation scale {scale} for a {bits}-bit input must be finite and positive; "
                         "the calibration data never reached this layer (--act-static)")
    old = getattr(module, "_normtweak_act_handle", None)
    if old is not None:
        old.remove()
    if bits >= 16:
        module._normtweak_act_handle = None
        module._normtweak_abits = 16
        module._normtweak_act_scale = None
        return
    module._normtweak_act_handle = module.register_forward_pre_hook(_act_hook(bits, scale))
    module._normtweak_abits = bits
    module._normtweak_act_scale = scale


@torch.no_grad()
def static_act_scales(block: torch.nn.Module, names: Sequence[str], inputs, kwargs, bits: int) -> dict[str, float]:
    """Per-tensor scales max|x| / (2^(bits-1) - 1) of each named Linear's input over the calibration inputs."""
    amax = dict.fromkeys(names, 0.0)

    def watcher(n: str):
        def watch(x):
            amax[n] = max(amax[n], x.abs().max().item())

        return watch

    run_watching_inputs(block, {n: watcher(n) for n in names}, inputs, kwargs)
    qmax = 2 ** (bits - 1) - 1
    return {n: a / qmax for n, a in amax.items()}


def fold_into_norm(norm: NormInfo, s: torch.Tensor) -> None:
    """Divide the norm's output channels by s (weight and bias; Gemma's (1 + w) kept exact)."""
    mod = norm.module
    with torch.no_grad():
        w = mod.weight
        if norm.unit_offset:
            w.copy_(((1.0 + w.double()) / s.double() - 1.0).to(w.dtype))
        else:
            w.copy_((w.double() / s.double()).to(w.dtype))
        if getattr(mod, "bias", None) is not None:
            mod.bias.copy_((mod.bias.double() / s.double()).to(mod.bias.dtype))


def scale_inputs(module: torch.nn.Module, s: torch.Tensor, adapter: Adapter) -> None:
    """W <- W diag(s) for a Linear [out, in] (or a Conv1D [in, out])."""
    W = linear_weight(module, adapter).double()
    set_linear_weight(module, (W * s.double()).float(), adapter)


def _pair_error(X: torch.Tensor, Ws: Sequence[torch.Tensor], s: torch.Tensor, wbits: int, group_size: int,
                sym: bool, abits: int) -> float:
    """sum_k ||X W_k^T - fq(X / s) Q_k^T||^2 with Q_k = RTN(W_k diag(s)): what a smoothing choice costs."""
    Xs = X / s
    if abits < 16:
        Xs = fake_quant_per_token(Xs, abits)
    err = 0.0
    for W in Ws:
        Q = core.rtn_quantize(W * s, bits=wbits, group_size=group_size, sym=sym).Q
        err += (X @ W.t() - Xs @ Q.t()).pow(2).sum().item()
    return err


def fold_into_linear_outputs(module: torch.nn.Module, s: torch.Tensor, adapter: Adapter) -> None:
    """Divide a Linear's output channels by s (weight rows and bias)."""
    W = linear_weight(module, adapter).double()
    set_linear_weight(module, (W / s.double()[:, None]).float(), adapter)
    if getattr(module, "bias", None) is not None:
        with torch.no_grad():
            module.bias.copy_((module.bias.double() / s.double()).to(module.bias.dtype))


@dataclass
class _Pair:
    """One smoothing site: the channels `fold` divides by s reach the `consumers`' inputs.

    A consumer input may be `group` channels wide per smoothed channel (grouped-query attention: the output
    projection reads each key/value head's channels once per query head sharing it); channel (h, c) of the
    consumer, with heads of `head_dim` channels, reads smoothed channel (h // group, c)."""

    name: str
    consumers: tuple[str, ...]
    fold: Callable[[torch.Tensor], None]
    group: int = 1
    head_dim: int = 1

    def reduce(self, v: torch.Tensor) -> torch.Tensor:
        """A per-consumer-channel maximum -> per smoothed channel."""
        if self.group == 1:
            return v
        return v.view(-1, self.group, self.head_dim).amax(1).reshape(-1)

    def expand(self, s: torch.Tensor) -> torch.Tensor:
        """Per smoothed channel -> per consumer input channel."""
        if self.group == 1:
            return s
        kv = s.numel() // self.head_dim
        return s.view(kv, 1, self.head_dim).expand(kv, self.group, self.head_dim).reshape(-1)

    def weight_views(self, W: torch.Tensor) -> list[torch.Tensor]:
        """A consumer weight [out, group * C] as `group` matrices [out, C] over the smoothed channels."""
        if self.group == 1:
            return [W]
        V = W.view(W.shape[0], -1, self.group, self.head_dim)
        return [V[:, :, i, :].reshape(W.shape[0], -1) for i in range(self.group)]


def smoothing_pairs(block: torch.nn.Module, adapter: Adapter, norms: Sequence[NormInfo],
                    linear_pairs: bool = True) -> list[_Pair]:
    """The block's smoothing sites: its two norm -> Linear pairs, then (with `linear_pairs`) the adapter's
    Linear -> Linear pairs."""
    pairs = [_Pair(norm.name, names, lambda s, _n=norm: fold_into_norm(_n, s))
             for norm, names in ((norms[0], adapter.groups[0]), (norms[1], adapter.groups[2]))]
    for producer, consumer in adapter.linear_pairs if linear_pairs else ():
        p, c = get_module(block, producer), get_module(block, consumer)
        n_out, n_in = linear_weight(p, adapter).shape[0], linear_weight(c, adapter).shape[1]
        head_dim = getattr(get_module(block, producer.rpartition(".")[0]), "head_dim", None) or 1
        if n_in % n_out or (n_in != n_out and n_out % head_dim):
            raise ValueError(f"cannot smooth {producer} -> {consumer}: {n_out} output channels do not map onto "
                             f"{n_in} input channels in heads of {head_dim} (the adapter's linear_pairs)")
        pairs.append(_Pair(f"{producer}->{consumer}", (consumer,),
                           lambda s, _p=p: fold_into_linear_outputs(_p, s, adapter), n_in // n_out, head_dim))
    return pairs


@torch.no_grad()
def smooth_block(block: torch.nn.Module, adapter: Adapter, norms: Sequence[NormInfo], inputs, kwargs, *,
                 alpha: Optional[float], wbits: int, group_size: int, sym: bool, abits: int,
                 prefix: str, max_tokens: int = 4096, linear_pairs: bool = True) -> list[dict]:
    """Smooth the block's (norm -> Linear layers) and, with `linear_pairs`, its (Linear -> Linear) pairs in place;
    returns [{"pair", "alpha", "max_before", "max_after"}] per pair. alpha None searches ALPHA_GRID per pair and
    leaving the pair as it is (reported as alpha None), by the pair's output error (needs the pair's inputs: at
    most `max_tokens` calibration tokens are kept for that)."""
    pairs = smoothing_pairs(block, adapter, norms, linear_pairs)
    accs, kept, watchers = [], [], {}
    for pair in pairs:
        first = pair.consumers[0]
        acc = core.ActAbsMax(linear_weight(get_module(block, first), adapter).shape[1])
        store: list[torch.Tensor] = []

        def watch(x, _acc=acc, _store=store):
            x = x.reshape(-1, x.shape[-1])
            _acc.add_batch(x)
            if alpha is None and sum(t.shape[0] for t in _store) < max_tokens:
                _store.append(x.float().clone())

        watchers[first] = watch
        accs.append(acc)
        kept.append(store)
    run_watching_inputs(block, watchers, inputs, kwargs)
    report = []
    for pair, acc, store in zip(pairs, accs, kept):
        mods = [get_module(block, n) for n in pair.consumers]
        Ws = [linear_weight(m, adapter).float() for m in mods]
        views = [v for W in Ws for v in pair.weight_views(W)]
        amax = acc.absmax()

        def factors(a: Optional[float]) -> torch.Tensor:
            if a is None:  # the pair left unsmoothed
                return torch.ones_like(pair.reduce(amax))
            return core.smooth_factors(pair.reduce(amax), views, a)

        if alpha is None:
            X = torch.cat(store)[:max_tokens]
            errs = {a: _pair_error(X, Ws, pair.expand(factors(a)), wbits, group_size, sym, abits)
                    for a in (None, *ALPHA_GRID)}
            a = min(errs, key=errs.get)
        else:
            a = alpha
        s = factors(a)
        if a is not None:
            pair.fold(s)
            for m in mods:
                scale_inputs(m, pair.expand(s), adapter)
        report.append({"pair": f"{prefix}.{pair.name}", "alpha": a, "max_before": amax.max().item(),
                       "max_after": (amax / pair.expand(s)).max().item()})
    return report
