"""Norm Tweaking on one decoder block: autograd functions backed by the C++ core
(ChannelDistLoss, LayerNorm/RMSNorm backward) and :func:`tweak_block`.

Paper: Li et al., "Norm Tweaking", arXiv 2309.02784, Algorithm 1 and eqs. 2-3.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from . import _core
from .core import _stream

log = logging.getLogger("normtweak")


LOSSES = _core.LOSSES  # ("dist", "mse", "kl", "reldist"), from the C++ enum


@dataclass
class TweakConfig:
    """Norm Tweaking settings.

    lr: lr0 of eq. 3 (the paper grid-searches it, starting at 1e-5).
    scale: eq. 3's step increase across blocks, lr_i = lr0 * (1 + scale * i / L).
    passes: passes over the calibration set (the paper's Table 6: 1 is best). 0 skips the
        per-block tweak and runs only the KL stage (`kl_norms`), e.g. on a model whose
        blocks were tweaked before; the report's per-block statistics (Figure 1) then
        compare each quantized block's output with the float model's own activations.
    loss: "dist" (eq. 2), "mse" or "kl" (Table 9 ablation), or "reldist": eq. 2 with each
        channel's terms in units of its float standard deviation and variance, so a few
        channels of very large variance do not outweigh the rest (docs/findings.md).
    batch_size: calibration samples per Adam step.
    rollback: keep a block's original norms when tweaking did not lower the
        loss (on the held-out samples when `holdout` > 0, else on the calibration batches).
    holdout: fraction of the calibration samples kept out of the Adam steps and
        used only to judge the tweak (0: judge on the training samples). With
        `lr_grid`, the fraction held out for the learning-rate search (default 1/8).
    lr_grid: when given, search lr0 over these values (`lr` is then ignored): the
        one whose tweak gives the lowest KL(float || quantized) on held-out
        calibration samples wins (see search.py). Costs one tweak walk per value
        and, inside `quantize`, a float copy of the model while it runs.
    order: "walk" (the paper's Algorithm 1: block l is quantized, then tweaked,
        and block l+1's GPTQ sees the tweaked output) or "after" (quantize every
        block first, then one tweak walk over the finished weights, as the
        post-step `tweak` does; keeps a float copy of the model while it runs).
        On SmolLM2-135M at W3 g128 "after" kept GPTQ's LAMBADA accuracy where
        "walk" lost 1.4 points (docs/findings.md).
    target: what block l's output is tweaked toward. "local" (the paper's
        Algorithm 1): the float block l on the quantized model's activations, so
        each block fixes only its own error. "float": the float model's own
        activations (the float blocks 0..l on the float path, as CBQ's and
        OmniQuant's reconstructions do), so each block's norms also absorb the
        error the quantized blocks before it passed on. Costs one more copy of
        the calibration activations. On SmolLM2-135M at W3 g128 (post-step, two
        calibration draws) it lost 13 LAMBADA passages like the local target.
    skip_first: leave the first N positions of every sample out of the loss.
        The first token of a sequence (the attention sink) carries "massive
        activations" in a few channels, thousands of times the others; over all
        tokens those few values can make a channel's variance 3000x what it is
        over the rest (SmolLM2, channel 507: docs/findings.md). With target
        "float" eq. 2 then spends its steps on that token; with local targets
        leaving it out (1) changed nothing measurable on SmolLM2.
    kl_norms: after the block walk, a second stage that tweaks norms so the
        quantized model's next-token distribution matches the float model's:
        Adam on KL(float || quantized) over the calibration tokens
        (:func:`tweak_norms_kl`). "off" (the paper), "final" (the norm before
        the LM head only, through the frozen head: cheap) or "all" (every norm
        of the model, end to end through the frozen quantized blocks: one
        forward and backward of the model per step). Not in the paper, which
        tweaks each block's norms toward eq. 2's channel statistics; on SmolLM2
        those never raised LAMBADA accuracy at 3 bits. With "all" at kl_lr 1e-3,
        one pass, after the paper's post-step tweak, W3 g128 GPTQ went from 710
        to 791 and from 855 to 941 of 5153 LAMBADA passages on two calibration
        draws (docs/findings.md); "final" alone cut the KL 1.7% at most.
    kl_lr: Adam's rate for that stage (one rate for every norm; eq. 3's schedule does not apply).
    kl_passes: passes over the calibration set for that stage.
    kl_judge: at most this many of the judge's samples (the held-out ones, or with holdout 0 the training ones),
        evenly spread, measure that stage's KL before and after for the rollback decision; 0: all of them. The
        norms it leaves are the same either way (unless the decision flips). The judge's measurement after the
        stage is one forward of the whole model per sample: on SmolLM2-135M at 128 x 256 tokens, judging on all
        samples took 96 s of the stage's 315 s. 32 samples of 256 tokens put 8192 positions behind each average,
        and the before/after comparison is paired on the same samples.
    """

    lr: float = 1e-5
    scale: float = 5.0
    passes: int = 1
    loss: str = "dist"
    batch_size: int = 1
    rollback: bool = True
    holdout: float = 0.0
    lr_grid: tuple = ()
    order: str = "walk"
    target: str = "local"
    skip_first: int = 0
    kl_norms: str = "off"
    kl_lr: float = 1e-3
    kl_passes: int = 1
    kl_judge: int = 32

    def __post_init__(self) -> None:
        if self.order not in ("walk", "after"):
            raise ValueError(f"tweak order={self.order!r} is not 'walk' or 'after' (--tweak-order)")
        if self.target not in ("local", "float"):
            raise ValueError(f"tweak target={self.target!r} is not 'local' or 'float' (--tweak-target)")
        self.lr_grid = tuple(float(v) for v in self.lr_grid)
        if any(not v > 0 for v in self.lr_grid):
            raise ValueError(f"lr_grid={list(self.lr_grid)} holds a non-positive learning rate (--tweak-lr)")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"holdout={self.holdout} must lie in [0, 1)")
        if not self.lr > 0:
            raise ValueError(f"tweak lr={self.lr} must be positive (--tweak-lr)")
        if self.scale < 0:
            raise ValueError(f"tweak scale={self.scale} must be non-negative (--tweak-scale)")
        if self.passes < 0:
            raise ValueError(f"tweak passes={self.passes} must be non-negative (--tweak-passes)")
        if self.passes == 0 and self.kl_norms == "off":
            raise ValueError("tweak passes=0 skips the per-block tweak, and with kl_norms='off' nothing would be "
                             "tweaked: give --tweak-passes 1 or more, or --kl-tweak final|all")
        if self.passes == 0 and self.lr_grid:
            raise ValueError(f"the learning-rate search (lr_grid={list(self.lr_grid)}) searches the per-block "
                             "tweak's lr0, which passes=0 skips: give one --tweak-lr or --tweak-passes 1 or more")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r} is not one of {', '.join(LOSSES)} (--loss)")
        if self.batch_size < 1:
            raise ValueError(f"tweak batch_size={self.batch_size} must be at least 1")
        if self.kl_norms not in ("off", "final", "all"):
            raise ValueError(f"tweak kl_norms={self.kl_norms!r} is not 'off', 'final' or 'all' (--kl-tweak)")
        if not self.kl_lr > 0:
            raise ValueError(f"tweak kl_lr={self.kl_lr} must be positive (--kl-lr)")
        if self.kl_passes < 1:
            raise ValueError(f"tweak kl_passes={self.kl_passes} must be at least 1 (--kl-passes)")
        if self.kl_judge < 0:
            raise ValueError(f"tweak kl_judge={self.kl_judge} must be 0 (every sample) or more (--kl-judge)")
        if self.skip_first < 0:
            raise ValueError(f"tweak skip_first={self.skip_first} must be non-negative (--tweak-skip-first)")


class ChannelDistLossFn(torch.autograd.Function):
    """L(q, f) with the C++ forward and hand-written backward; f is a constant target."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, f: torch.Tensor, kind: str = "dist") -> torch.Tensor:
        qc = q.detach().float().contiguous()
        grad = torch.empty_like(qc)
        loss = _core.channel_dist_loss(f.detach().float().contiguous(), qc, kind, grad, stream=_stream(qc))
        ctx.save_for_backward(grad)
        ctx.q_dtype = q.dtype
        return torch.tensor(loss, dtype=torch.float32, device=q.device)

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return (grad * grad_out).to(ctx.q_dtype), None, None


def channel_dist_loss(q: torch.Tensor, f: torch.Tensor, kind: str = "dist") -> torch.Tensor:
    """Paper eq. 2 between quantized output q and float output f, both [..., C]."""
    return ChannelDistLossFn.apply(q, f, kind)


class NormFn(torch.autograd.Function):
    """LayerNorm / RMSNorm with the C++ forward and hand-written backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, kind: str, eps: float, unit_offset: bool):
        shape, dtype = x.shape, x.dtype
        x2 = x.detach().float().reshape(-1, shape[-1]).contiguous()
        w = weight.detach().float().contiguous()
        b = None if bias is None else bias.detach().float().contiguous()
        y = torch.empty_like(x2)
        rstd = torch.empty(x2.shape[0])
        mean = torch.empty(x2.shape[0]) if kind == "layer" else None
        _core.norm_forward(kind, eps, unit_offset, x2, w, b, y, rstd, mean, stream=_stream(x2))
        ctx.save_for_backward(x2, w, rstd, *(() if mean is None else (mean,)))
        ctx.meta = (kind, eps, unit_offset, shape, dtype, bias is not None, weight.dtype)
        return y.reshape(shape).to(dtype)

    @staticmethod
    def backward(ctx, dy):
        kind, eps, unit_offset, shape, dtype, has_bias, wdtype = ctx.meta
        x2, w, rstd, *rest = ctx.saved_tensors
        mean = rest[0] if rest else None
        dy2 = dy.float().reshape(-1, shape[-1]).contiguous()
        dx = torch.empty_like(x2)
        dw = torch.empty_like(w)
        db = torch.empty_like(w) if has_bias else None
        _core.norm_backward(kind, eps, unit_offset, x2, w, dy2, rstd, mean, dx, dw, db, stream=_stream(x2))
        return dx.reshape(shape).to(dtype), dw.to(wdtype), (db.to(wdtype) if has_bias else None), None, None, None


@dataclass
class NormInfo:
    """A norm module of a block and how to compute it."""

    name: str
    module: torch.nn.Module
    kind: str  # "rms" or "layer"
    eps: float
    unit_offset: bool = False  # Gemma: y = x * rstd * (1 + w)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        ps = [self.module.weight]
        if getattr(self.module, "bias", None) is not None:
            ps.append(self.module.bias)
        return ps


@contextlib.contextmanager
def core_norms(norms: Sequence[NormInfo]) -> Iterator[None]:
    """Route the norms' forward (and so backward) through the C++ kernels."""
    saved = []
    for n in norms:
        mod = n.module
        bias = getattr(mod, "bias", None)

        def fwd(x, _n=n, _mod=mod, _bias=bias):
            return NormFn.apply(x, _mod.weight, _bias, _n.kind, _n.eps, _n.unit_offset)

        saved.append((mod, mod.__dict__.get("forward")))
        mod.forward = fwd
    try:
        yield
    finally:
        for mod, old in saved:
            if old is None:
                del mod.forward
            else:
                mod.forward = old


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class _StopForward(Exception):
    """Raised by a forward hook to end a forward pass once everything it was run for has been seen."""


# Tokens per no-grad block forward when consecutive samples run as one batch. On SmolLM2-135M (576 channels, 2
# threads) a block over 16 samples of 256 tokens took 250 ms one sample at a time, 191 ms four at a time and 205 ms
# sixteen at a time, with outputs equal to the bit; training steps keep their own batch (TweakConfig.batch_size).
FORWARD_TOKENS = 1024


def _broadcasts(v) -> bool:
    """Whether a block keyword argument serves a batch of samples as it serves one: tensors with a leading
    dimension of 1 (masks, position embeddings) do; BLOOM's ALiBi tensor, [heads, 1, seq], does not."""
    if isinstance(v, torch.Tensor):
        return v.dim() == 0 or v.shape[0] == 1
    if isinstance(v, (tuple, list)):
        return all(_broadcasts(u) for u in v)
    return True


def forward_batches(inputs: Sequence[torch.Tensor], kwargs: dict,
                    tokens: int | None = None) -> Iterator[list[torch.Tensor]]:
    """Consecutive runs of `inputs` that one block forward may take together: equal shapes past the batch
    dimension, at most `tokens` tokens in all (a longer input runs alone), and single inputs when `kwargs` do not
    broadcast over a batch. Each sample's output is the one its own forward gives. tokens: FORWARD_TOKENS when
    None."""
    tokens = FORWARD_TOKENS if tokens is None else tokens
    if not _broadcasts(list(kwargs.values())):
        yield from ([x] for x in inputs)
        return
    run: list[torch.Tensor] = []
    held = 0  # tokens in `run`
    for x in inputs:
        n = x.shape[:-1].numel()
        if run and (x.shape[1:] != run[0].shape[1:] or held + n > tokens):
            yield run
            run, held = [], 0
        run.append(x)
        held += n
    if run:
        yield run


def _joined(xs: list[torch.Tensor]) -> torch.Tensor:
    """One forward_batches run as the batch a block forward takes."""
    return torch.cat(xs) if len(xs) > 1 else xs[0]


def _per_input(x: torch.Tensor, sizes: list[int]) -> Sequence[torch.Tensor]:
    """A batched forward's tensor cut back into each input's share: the leading dimension holds the inputs in
    order, either as they were ([batch, seq, C]) or flattened with their positions ([batch * seq, C], as OPT's
    MLP sees them)."""
    if len(sizes) == 1:
        return (x,)
    n = sum(sizes)
    if x.shape[0] % n:
        raise RuntimeError(f"a batched block forward saw a tensor of shape {tuple(x.shape)} that does not divide "
                           f"among its {len(sizes)} inputs of batch sizes {sizes}")
    return x.split([s * (x.shape[0] // n) for s in sizes])


@torch.no_grad()
def run_block(block: torch.nn.Module, inputs: Sequence[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    """The block's output on each input, batching consecutive inputs (forward_batches)."""
    out: list[torch.Tensor] = []
    for xs in forward_batches(inputs, kwargs):
        out += _per_input(_first(block(_joined(xs), **kwargs)), [x.shape[0] for x in xs])
    return out


@torch.no_grad()
def run_watching_inputs(block: torch.nn.Module, watchers: dict[str, Callable[[torch.Tensor], None]], inputs,
                        kwargs) -> None:
    """Run `block` over `inputs`, handing each named submodule's input tensor to its watcher on every call
    (statistics gathering: Hessians, activation maxima); the hooks are removed afterwards. Consecutive inputs run
    as one batch (forward_batches), and the watchers still see one input's share at a time, in order: what they
    accumulate is summed as it would be one input at a time.

    The first batch runs the whole block. When every watched submodule ran exactly once in it, the later batches
    stop the forward as soon as the last watched one has its input: the query/key/value projections of a block
    are reached after its first norm, so gathering their Hessians costs almost nothing, and nothing after the
    MLP's down projection runs when it is watched."""
    calls = dict.fromkeys(watchers, 0)
    early = False
    sizes: list[int] = []  # the batch sizes of the inputs in the forward that runs

    def pre_hook(name: str, fn: Callable[[torch.Tensor], None]):
        def hook(mod, args):
            x = args[0].detach()
            for part in _per_input(x, sizes):
                fn(part)
            calls[name] += 1
            if early and all(calls.values()):
                raise _StopForward

        return hook

    hooks = [block.get_submodule(name).register_forward_pre_hook(pre_hook(name, fn))
             for name, fn in watchers.items()]
    try:
        for i, xs in enumerate(forward_batches(inputs, kwargs)):
            calls.update(dict.fromkeys(calls, 0))
            sizes[:] = [x.shape[0] for x in xs]
            try:
                block(_joined(xs), **kwargs)
            except _StopForward:
                pass
            if i == 0:
                early = all(c == 1 for c in calls.values())
    finally:
        for h in hooks:
            h.remove()


def _split_holdout(inputs: Sequence, targets: Sequence, holdout: float) -> tuple[Sequence, ...]:
    """(train inputs, train targets, judge inputs, judge targets): the last `holdout` fraction of the samples (at
    least one stays for training) only judges the tweak; with none held out, the training samples judge it."""
    n_hold = int(len(inputs) * holdout)
    if n_hold and n_hold == len(inputs):
        n_hold = len(inputs) - 1
    if not n_hold:
        return inputs, targets, inputs, targets
    return inputs[:-n_hold], targets[:-n_hold], inputs[-n_hold:], targets[-n_hold:]


def kl_steps(samples: int, config: TweakConfig) -> int:
    """Adam steps tweak_norms_kl takes over `samples` calibration samples (for a progress bar)."""
    idx = list(range(samples))
    train = _split_holdout(idx, idx, config.holdout)[0]
    return config.kl_passes * -(-len(train) // config.batch_size)


def _kept(targets: Sequence[torch.Tensor], skip: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """t -> t without the first `skip` positions ([batch, seq, ...]); checks that every target keeps a token."""
    if skip and any(f.dim() < 3 or f.shape[1] <= skip for f in targets):
        raise ValueError(f"skip_first={skip} leaves no token of a block output of shape "
                         f"{tuple(targets[0].shape)} (--tweak-skip-first must be below the sequence length)")
    return (lambda t: t[:, skip:]) if skip else (lambda t: t)


@contextlib.contextmanager
def _training_only(train: Sequence[torch.nn.Parameter], frozen) -> Iterator[None]:
    """Gradients for `train` alone inside the block; every requires_grad flag and gradient is put back afterwards."""
    frozen = list(frozen)
    requires = {id(p): p.requires_grad for p in frozen + list(train)}
    for p in frozen:
        p.requires_grad_(False)
    for p in train:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen + list(train):
            p.requires_grad_(requires[id(p)])
            p.grad = None


def _adam_with_rollback(params: Sequence[torch.nn.Parameter], norms: Sequence[NormInfo], frozen, tweaker,
                        losses: Callable[[], Iterator[torch.Tensor]], eval_before: Callable[[], float],
                        eval_after: Callable[[], float], rollback: bool,
                        progress: Callable[[int], None] | None) -> dict:
    """One Adam step (the C++ NormTweaker) on `params` per loss that `losses()` yields, with the norms' backward
    in C++ and `frozen` held fixed; afterwards the params go back to where they started when the judge (computed
    through the modules' own forward: `eval_before` ahead of the steps, `eval_after` after them) did not fall and
    `rollback` is set."""
    for p in params:
        if p.dtype != torch.float32:
            raise ValueError(f"norm parameters must be float32 for tweaking, got {p.dtype}")
    originals = [p.detach().clone() for p in params]
    with _training_only(params, frozen):
        before = eval_before()
        with core_norms(norms):
            for loss in losses():
                for p in params:
                    p.grad = None
                loss.backward()
                tweaker.step([p.grad.float().contiguous() for p in params])
                if progress:
                    progress(1)
        after = eval_after()
        rolled_back = bool(rollback and not after < before)
        if rolled_back:
            with torch.no_grad():
                for p, o in zip(params, originals):
                    p.copy_(o)
    return {"loss_before": before, "loss_after": before if rolled_back else after, "rolled_back": rolled_back,
            "steps": tweaker.steps}


def _batches(inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], config: TweakConfig, passes: int):
    """(x, target) batches of `config.batch_size` samples, `passes` times over the training samples."""
    for _ in range(passes):
        for start in range(0, len(inputs), config.batch_size):
            xs, fs = inputs[start : start + config.batch_size], targets[start : start + config.batch_size]
            yield (torch.cat(list(xs)) if len(xs) > 1 else xs[0]), (torch.cat(list(fs)) if len(fs) > 1 else fs[0])


def tweak_block(
    quant_block: torch.nn.Module,
    norms: Sequence[NormInfo],
    inputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    block_kwargs: dict,
    config: TweakConfig,
    layer_index: int,
    num_layers: int,
    progress: Callable[[int], None] | None = None,
    outputs: Sequence[torch.Tensor] | None = None,
) -> dict:
    """Tweak the norm parameters of one quantized block (Alg. 1, lines 11-15).

    quant_block: the block with its Linear weights already quantized (frozen here).
    norms: the block's norm modules (their parameters are updated in place).
    inputs: the block's inputs, each [batch, seq, C] (the quantized model's activations).
    targets: the float block's outputs on the same inputs.
    outputs: the quantized block's outputs on `inputs` before the tweak, when the caller has them (the walk
        does): the judge then takes its starting loss from them instead of running the block again.
    Returns {"loss_before", "loss_after", "lr", "rolled_back", "steps"}; when every input judged the tweak
    (holdout 0) also "outputs": the block's outputs on `inputs` as it is left, tweaked or rolled back.
    """
    if not norms:
        raise ValueError("tweak_block needs at least one norm module; this block has none")
    if config.passes < 1:
        raise ValueError(f"tweak_block with passes={config.passes} would not tweak anything: give passes >= 1")
    if outputs is not None and len(outputs) != len(inputs):
        raise ValueError(f"tweak_block got {len(outputs)} outputs for {len(inputs)} inputs")
    params = [p for n in norms for p in n.params]
    tweaker = _core.NormTweaker(config.lr, config.scale, config.passes, num_layers)
    tweaker.begin_layer(layer_index, [p.data for p in params])
    n = len(inputs)
    # The judge's share of the caller's outputs, split the same way as the inputs and targets.
    judge_q = _split_holdout(inputs, outputs, config.holdout)[3] if outputs is not None else None
    inputs, targets, judge_x, judge_f = _split_holdout(inputs, targets, config.holdout)
    whole = len(judge_x) == n  # the judge runs the block on every input: its outputs are the walk's next inputs
    kept = _kept(targets, config.skip_first)
    judged: dict[str, list[torch.Tensor]] = {}

    def judge(outs: Sequence[torch.Tensor] | None, when: str) -> float:
        with torch.no_grad():
            if outs is None:
                outs = run_block(quant_block, judge_x, block_kwargs)
        judged[when] = list(outs)
        total = 0.0
        for f, q in zip(judge_f, outs):
            total += _core.channel_dist_loss(kept(f).float().contiguous(), kept(q).float().contiguous(), config.loss)
        return total / len(judge_x)

    def losses() -> Iterator[torch.Tensor]:
        for x, f in _batches(inputs, targets, config, config.passes):
            yield channel_dist_loss(kept(_first(quant_block(x, **block_kwargs))), kept(f), config.loss)

    out = _adam_with_rollback(params, norms, quant_block.parameters(), tweaker, losses, lambda: judge(judge_q, "before"),
                              lambda: judge(None, "after"), config.rollback, progress)
    if whole:
        out["outputs"] = judged["before" if out["rolled_back"] else "after"]
    if out["rolled_back"]:
        log.info("block %d: tweaking raised the loss (%.4g -> %.4g); norms rolled back", layer_index,
                 out["loss_before"], out["loss_after"])
    return {**out, "lr": tweaker.lr(layer_index)}


def next_token_kl_ref(q_logits: torch.Tensor, f_logits: torch.Tensor) -> torch.Tensor:
    """next_token_kl's plain twin: the formula on whole tensors, differentiated by autograd."""
    lf = torch.log_softmax(f_logits.float(), -1)
    lq = torch.log_softmax(q_logits.float(), -1)
    return (lf.exp() * (lf - lq)).sum(-1).mean()


# Positions per slice: about 4 MiB of float32 logits at a 49152-token vocabulary. The whole-tensor formula makes
# seven temporaries the size of the logits (50 MB each for 256 positions there), each in fresh pages from the OS
# (glibc maps allocations over 32 MiB anew); in slices they stay in cache. On SmolLM2-135M that took a KL-stage
# step's loss and backward from 0.88 to 0.78 s (256 positions, 2 threads, interleaved).
KL_SLICE_BYTES = 4 << 20


class NextTokenKLFn(torch.autograd.Function):
    """next_token_kl_ref a slice of positions at a time, forward and backward, with the same operations per
    position as autograd runs on the whole tensors, so loss and gradient equal the twin's to the bit (tested):
    runs stored before the slicing reproduce. f is a constant target."""

    @staticmethod
    def _slices(q_logits: torch.Tensor, f_logits: torch.Tensor, rows: int):
        """(slice start, log-softmax of f, of q) over the flattened positions, a slice at a time."""
        V = q_logits.shape[-1]
        q, f = q_logits.detach().reshape(-1, V), f_logits.detach().reshape(-1, V)
        for r in range(0, q.shape[0], rows):
            yield r, torch.log_softmax(f[r : r + rows].float(), -1), torch.log_softmax(q[r : r + rows].float(), -1)

    @staticmethod
    def forward(ctx, q_logits: torch.Tensor, f_logits: torch.Tensor) -> torch.Tensor:
        ctx.rows = max(1, KL_SLICE_BYTES // (4 * q_logits.shape[-1]))
        per_pos = torch.empty(q_logits.numel() // q_logits.shape[-1], dtype=torch.float32, device=q_logits.device)
        for r, lf, lq in NextTokenKLFn._slices(q_logits, f_logits, ctx.rows):
            torch.sum(lf.exp() * (lf - lq), -1, out=per_pos[r : r + lf.shape[0]])
        ctx.save_for_backward(q_logits, f_logits)
        return per_pos.mean()

    @staticmethod
    def backward(ctx, grad_out):
        # The log-softmaxes are computed again, a slice at a time: keeping them from the forward would hold two
        # more logits-sized tensors between forward and backward.
        q_logits, f_logits = ctx.saved_tensors
        V = q_logits.shape[-1]
        grad = torch.empty((q_logits.numel() // V, V), dtype=torch.float32, device=q_logits.device)
        g = grad_out.float() / grad.shape[0]  # mean's backward, as autograd divides
        for r, lf, lq in NextTokenKLFn._slices(q_logits, f_logits, ctx.rows):
            # d/dlq of sum(pf * (lf - lq)) is -g * pf; then log_softmax's backward: dlq - softmax(q) * sum(dlq)
            dlq = (g * lf.exp()).neg_()
            grad[r : r + lf.shape[0]] = torch._log_softmax_backward_data(dlq, lq, -1, torch.float32)
        return grad.view(q_logits.shape).to(q_logits.dtype), None


def next_token_kl(q_logits: torch.Tensor, f_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(float || quantized) between next-token distributions.

    q_logits, f_logits: [..., vocab], any float dtype, the same shape; f_logits gets no gradient. Returns a
    float32 scalar, equal to next_token_kl_ref's to the bit, computed in slices of KL_SLICE_BYTES.
    """
    if q_logits.shape != f_logits.shape:
        raise ValueError(f"next_token_kl: quantized logits {tuple(q_logits.shape)} and float logits "
                         f"{tuple(f_logits.shape)} differ in shape")
    return NextTokenKLFn.apply(q_logits, f_logits)


def tweak_norms_kl(
    norms: Sequence[NormInfo],
    quant_logits: Callable[[list[int]], torch.Tensor],
    float_logits: Callable[[list[int]], torch.Tensor],
    samples: int,
    config: TweakConfig,
    frozen=(),
    progress: Callable[[int], None] | None = None,
    logits_before: Callable[[list[int]], torch.Tensor] | None = None,
) -> dict:
    """Tweak `norms` so the quantized model's next-token distribution matches the float model's: Adam (the C++
    NormTweaker, rate `config.kl_lr`, `config.kl_passes` passes) on KL(float || quantized) over the calibration
    samples, the norms' backward in C++. TweakConfig.kl_norms picks the norms: the final one, or every one.

    quant_logits: sample indices -> the quantized model's logits [batch, seq, vocab] (through `norms`, with grad).
    float_logits: sample indices -> the float model's logits on the same samples (computed without grad).
    samples: how many calibration samples there are; the last `config.holdout` of them only judge the tweak.
    frozen: parameters held fixed while the norms train (the rest of the model).
    logits_before: sample indices -> the quantized model's logits as they stand before the tweak, by a cheaper
        road than `quant_logits` when there is one (the walk's last hidden states through the final norm and the
        head); the judge's starting loss comes from it.
    Returns {"loss_before", "loss_after", "lr", "rolled_back", "steps", "judged"}; the losses are the KL in nats
    per token on the `judged` samples: the held-out ones when `config.holdout` > 0, at most `config.kl_judge` of
    them.
    """
    if not norms:
        raise ValueError("tweak_norms_kl needs at least one norm module")
    params = [p for n in norms for p in n.params]
    tweaker = _core.NormTweaker(config.kl_lr, 0.0, config.kl_passes, 1)
    tweaker.begin_layer(0, [p.data for p in params])
    idx = list(range(samples))
    train, _, judge, _ = _split_holdout(idx, idx, config.holdout)
    if 0 < config.kl_judge < len(judge):
        judge = [judge[i * len(judge) // config.kl_judge] for i in range(config.kl_judge)]
    skip = config.skip_first

    def loss(batch: list[int], logits: Callable[[list[int]], torch.Tensor] = quant_logits) -> torch.Tensor:
        with torch.no_grad():
            target = float_logits(batch)
        if skip and target.shape[1] <= skip:
            raise ValueError(f"skip_first={skip} leaves no token of {target.shape[1]}-token samples "
                             "(--tweak-skip-first must be below the sequence length)")
        return next_token_kl(logits(batch)[:, skip:], target[:, skip:])

    def eval_loss(logits: Callable[[list[int]], torch.Tensor] = quant_logits) -> float:
        with torch.no_grad():
            return sum(loss([j], logits).item() for j in judge) / len(judge)

    def losses() -> Iterator[torch.Tensor]:
        for _ in range(config.kl_passes):
            for start in range(0, len(train), config.batch_size):
                yield loss(train[start : start + config.batch_size])

    out = _adam_with_rollback(params, norms, frozen, tweaker, losses, lambda: eval_loss(logits_before or quant_logits),
                              eval_loss, config.rollback, progress)
    if out["rolled_back"]:
        log.info("KL tweak: the next-token KL rose (%.4g -> %.4g); norms rolled back", out["loss_before"],
                 out["loss_after"])
    return {**out, "lr": config.kl_lr, "judged": len(judge)}
