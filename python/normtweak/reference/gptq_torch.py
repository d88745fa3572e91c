"""GPTQ as the reference implementation (gptq/gptq.py, Frantar et al. 2022) writes it, in PyTorch.

This is the straightforward version a user would otherwise run: float32 torch
ops, a Python loop over columns, lazy block updates as one matmul per block.
normtweak's C++ GPTQ is tested against it and benchmarked beside it.

One deliberate difference from the original: when a quantization group starts
inside a block, its (scale, zero) come from the error-updated block copy W1,
not from the stale W. This is what the column-by-column algorithm computes and
what normtweak implements (see detail/quantizer-inl.h, effective_blocksize).
"""

from __future__ import annotations

import math

import torch


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def find_params(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) of x [rows, cols], as gptq/quant.py (no clipping search)."""
    maxq = 2**bits - 1
    zero = torch.zeros(x.shape[0])
    xmin = torch.minimum(x.min(1)[0], zero)
    xmax = torch.maximum(x.max(1)[0], zero)
    if sym:
        xmax = torch.maximum(torch.abs(xmin), xmax)
        tmp = xmin < 0
        if torch.any(tmp):
            xmin[tmp] = -xmax[tmp]
    tmp = (xmin == 0) & (xmax == 0)
    xmin[tmp] = -1
    xmax[tmp] = +1
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale.unsqueeze(1), zero.unsqueeze(1)


def add_batch(H: torch.Tensor, nsamples: int, inp: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The reference's streaming Hessian update, counting tokens: H = 2/n sum x x^T."""
    inp = inp.reshape(-1, inp.shape[-1]).t().float()
    tmp = inp.shape[1]
    H *= nsamples / (nsamples + tmp)
    nsamples += tmp
    inp = math.sqrt(2 / nsamples) * inp
    H += inp.matmul(inp.t())
    return H, nsamples


def gptq(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int = 4,
    group_size: int = -1,
    sym: bool = True,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Returns (dequantized Q [out, in] float32, integer codes [out, in], loss). Mirrors fasterquant()."""
    W = W.clone().float()
    H = H.clone().float()
    rows, columns = W.shape
    maxq = 2**bits - 1
    scale, zero = find_params(W, bits, sym)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = torch.argsort(perm)
    Losses = torch.zeros_like(W)
    Q = torch.zeros_like(W)
    C = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        C1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if group_size != -1 and (i1 + i) % group_size == 0:
                if i + group_size <= count:
                    scale, zero = find_params(W1[:, i : i + group_size], bits, sym)
                else:
                    scale, zero = find_params(W[:, (i1 + i) : (i1 + i + group_size)], bits, sym)
            c = torch.clamp(torch.round(w.unsqueeze(1) / scale) + zero, 0, maxq)
            q = (scale * (c - zero)).flatten()
            C1[:, i] = c.flatten()
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d**2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        C[:, i1:i2] = C1
        Losses[:, i1:i2] = Losses1 / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if act_order:
        Q = Q[:, invperm]
        C = C[:, invperm]
    return Q, C.to(torch.uint8), torch.sum(Losses).item()
