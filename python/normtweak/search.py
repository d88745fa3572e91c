"""Per-model learning-rate search for Norm Tweaking on held-out calibration samples.

The paper grid-searches lr0 per model and reports the best. Here the choice is
made on data the tweak never trained on: the calibration samples are split into
a training part and a held-out part; for each lr0 of the grid the norms are
reset, the tweak walk (post-step, Algorithm 1 on the already-quantized weights)
runs on the training part, and the mean per-token KL(float || quantized) of the
next-token distributions on the held-out part is measured. The lr0 with the
lowest KL wins; when none beats the untweaked model the norms stay untouched.

KL on held-out *calibration* samples measures fit to the calibration
distribution; it does not see a shift to other text. Keep the grid in the
paper's range (the default tops out at 1e-4) or calibrate on text like the
text the model will see.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from .models import all_norms
from .tweak import next_token_kl

log = logging.getLogger("normtweak")

# Capped at 1e-4: on SmolLM2-135M the held-out KL kept falling up to lr0 = 1e-3 while
# LAMBADA accuracy fell below the untweaked model's beyond 1e-4 (docs/findings.md).
DEFAULT_GRID = (1e-5, 3e-5, 1e-4)


@dataclass
class LRSearch:
    lr: Optional[float]  # the chosen lr0; None when no tweak beat the untweaked model
    kl_untweaked: float
    kl: float  # held-out KL of the chosen model
    table: list = field(default_factory=list)  # [(lr0, held-out KL)]
    holdout_samples: int = 0


def split_holdout(calib: torch.Tensor, holdout: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(training samples, held-out samples): the last `holdout` fraction (at least one) is held out."""
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"learning-rate search needs a held-out fraction in (0, 1), got {holdout} (--tweak-holdout)")
    n_hold = max(1, round(calib.shape[0] * holdout))
    if n_hold >= calib.shape[0]:
        raise ValueError(f"{calib.shape[0]} calibration samples are too few to hold {n_hold} out for the "
                         "learning-rate search; give more (--nsamples)")
    return calib[:-n_hold], calib[-n_hold:]


@torch.no_grad()
def heldout_kl(float_model, qmodel, ids: torch.Tensor) -> float:
    """Mean over tokens of KL(p_float || p_quantized) of the next-token distributions."""
    total, count = 0.0, 0
    for i in range(ids.shape[0]):
        x = ids[i : i + 1]
        q, f = (m(input_ids=x, use_cache=False).logits for m in (qmodel, float_model))
        kl = next_token_kl(q, f)
        total += kl.item() * x.shape[1]
        count += x.shape[1]
    return total / count


def _norm_params(model) -> list[torch.nn.Parameter]:
    """Every norm parameter a tweak walk may move: the blocks' and the final norm's."""
    return [p for n in all_norms(model) for p in n.params]


def norm_state(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in _norm_params(model)]


def load_norm_state(model, state: list[torch.Tensor]) -> None:
    params = _norm_params(model)
    with torch.no_grad():
        for p, s in zip(params, state, strict=True):
            p.copy_(s)


def search_lr(float_model, qmodel, calib: torch.Tensor, tweak, grid=DEFAULT_GRID, holdout: float = 0.125,
              progress: bool = True):
    """Tweak `qmodel` (already quantized) with the lr0 of `grid` that gives the lowest held-out KL.

    Returns (LRSearch, the QuantizeReport of the chosen tweak walk, or None when no lr0 won).
    """
    from .pipeline import GPTQConfig, quantize

    if not grid:
        raise ValueError("the learning-rate grid is empty (--tweak-lr auto or a comma-separated list)")
    if any(not lr > 0 for lr in grid):
        raise ValueError(f"learning-rate grid {list(grid)} holds a non-positive value (--tweak-lr)")
    train, hold = split_holdout(calib, holdout)
    start = norm_state(qmodel)
    base = heldout_kl(float_model, qmodel, hold)
    log.info("lr search: untweaked held-out KL %.5f on %d samples", base, hold.shape[0])
    best_kl, best_lr, best_state, best_report = base, None, start, None
    table = []
    for lr in grid:
        load_norm_state(qmodel, start)
        report = quantize(qmodel, train, GPTQConfig(), replace(tweak, lr=lr, lr_grid=()), progress=progress,
                          float_model=float_model)
        kl = heldout_kl(float_model, qmodel, hold)
        table.append((lr, kl))
        log.info("lr search: lr0 %.3g -> held-out KL %.5f", lr, kl)
        if kl < best_kl:
            best_kl, best_lr, best_state, best_report = kl, lr, norm_state(qmodel), report
    load_norm_state(qmodel, best_state)
    if best_lr is None:
        log.warning("lr search: no learning rate of %s lowered the held-out KL (%.5f); norms left untweaked",
                    list(grid), base)
    return LRSearch(best_lr, base, best_kl, table, hold.shape[0]), best_report
