"""PyTorch-facing wrappers of the C++ quantizers, Hessian accumulator and packing.

Every tensor argument is a ``torch.Tensor`` (or anything with ``__dlpack__``)
on the CPU; results come back as ``torch.Tensor`` sharing memory with the C++
buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import _core


def _t(x) -> torch.Tensor:
    return torch.from_dlpack(x)


def _stream(x: torch.Tensor) -> int:
    """PyTorch's current stream on x's device as an integer (0 on the CPU): CUDA work queues there."""
    return torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else 0


def _in(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x.detach()


@dataclass
class QuantResult:
    """Result of quantizing one Linear weight ``W [out, in]``.

    Q: [out, in] float32 dequantized weights (original column order).
    codes: [out, in] uint8 integer codes in [0, 2^bits - 1].
    scales, zeros: [out, ngroups] float32 (zeros are integer-valued).
    g_idx: [in] int32 group of each input column.
    perm: [in] int32 act-order column order, or None.
    loss: GPTQ's sum (w - q)^2 / [H^-1]_ii^2 / 2 (RTN: sum (w - q)^2).
    smooth: [in] float32 SmoothQuant factors s (Q then approximates W diag(s)), or None.
    """

    Q: Optional[torch.Tensor]  # None once the pipeline has written it into the layer
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    perm: Optional[torch.Tensor]
    loss: float
    percdamp: float
    fell_back_to_rtn: bool
    method: str
    bits: int
    group_size: int
    sym: bool
    smooth: Optional[torch.Tensor] = None


def _result(d: dict, bits: int, group_size: int, sym: bool) -> QuantResult:
    return QuantResult(
        Q=_t(d["Q"]),
        codes=_t(d["codes"]),
        scales=_t(d["scales"]),
        zeros=_t(d["zeros"]),
        g_idx=_t(d["g_idx"]),
        perm=None if d["perm"] is None else _t(d["perm"]),
        loss=d["loss"],
        percdamp=d["percdamp"],
        fell_back_to_rtn=d["fell_back_to_rtn"],
        method=d["method"],
        bits=bits,
        group_size=group_size,
        sym=sym,
        smooth=None if d.get("smooth") is None else _t(d["smooth"]),
    )


def rtn_quantize(
    W: torch.Tensor,
    *,
    bits: int = 4,
    group_size: int = -1,
    sym: bool = True,
    mse: bool = False,
    name: str = "",
) -> QuantResult:
    """Round-to-nearest quantization of ``W [out, in]`` (float32/float16/bfloat16/float64, CPU)."""
    d = _core.rtn_quantize(_in(W, "W"), bits=bits, group_size=group_size, sym=sym, mse=mse, name=name,
                           stream=_stream(W))
    return _result(d, bits, group_size, sym)


class ActAbsMax:
    """Per-channel running max |x| of the activations entering a layer (SmoothQuant's statistic)."""

    def __init__(self, channels: int):
        self._acc = _core.ActAbsMax(channels)

    def add_batch(self, X: torch.Tensor) -> None:
        """X: [..., channels] float32/float16/bfloat16/float64 on the CPU."""
        self._acc.add_batch(_in(X, "X"))

    @property
    def tokens(self) -> int:
        return self._acc.tokens

    def absmax(self) -> torch.Tensor:
        """[channels] float32 (a copy)."""
        return _t(self._acc.absmax()).clone()


def smooth_factors(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant factors s [in] = max|X_j|^alpha / max|W_j|^(1 - alpha) (paper eq. 4), the weight
    maximum taken over every W [out_k, in] that reads the same input."""
    return _t(_core.smooth_factors(_in(act_absmax.float(), "act_absmax"), [_in(W, "W") for W in weights],
                                   alpha)).clone()


def smoothquant_quantize(W: torch.Tensor, s: torch.Tensor, *, bits: int = 8, group_size: int = -1, sym: bool = True,
                         name: str = "") -> QuantResult:
    """Round-to-nearest quantization of the smoothed weights W diag(s); W [out, in], s [in] float32."""
    d = _core.smoothquant_quantize(_in(W, "W"), _in(s.float(), "s"), bits=bits, group_size=group_size, sym=sym,
                                   name=name)
    return _result(d, bits, group_size, sym)


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    bits: int = 4,
    group_size: int = -1,
    sym: bool = True,
    mse: bool = False,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    damp_retries: int = 3,
    name: str = "",
) -> QuantResult:
    """GPTQ quantization of ``W [out, in]`` given the layer Hessian ``H [in, in]`` (float32/float64).

    ``name`` is the layer's name, used in warnings (damping retries, RTN fallback).
    """
    d = _core.gptq_quantize(
        _in(W, "W"),
        _in(H, "H"),
        bits=bits,
        group_size=group_size,
        sym=sym,
        mse=mse,
        blocksize=blocksize,
        percdamp=percdamp,
        act_order=act_order,
        static_groups=static_groups,
        damp_retries=damp_retries,
        name=name,
        stream=_stream(W),
    )
    return _result(d, bits, group_size, sym)


class HessianAccumulator:
    """Streaming ``H = 2/n * sum_t x_t x_t^T`` over the tokens a Linear layer sees.

    ``add_batch(X)`` takes activations ``[..., columns]`` in float32/float64/
    float16/bfloat16 on the CPU. ``dtype`` is the accumulation type.
    """

    def __init__(self, columns: int, dtype: torch.dtype = torch.float32):
        if dtype == torch.float32:
            self._acc = _core.HessianAccumulatorF32(columns)
        elif dtype == torch.float64:
            self._acc = _core.HessianAccumulatorF64(columns)
        else:
            raise ValueError(f"accumulation dtype must be torch.float32 or torch.float64, got {dtype}")

    def add_batch(self, X: torch.Tensor) -> None:
        self._acc.add_batch(_in(X, "X"))

    @property
    def nsamples(self) -> int:
        return self._acc.nsamples

    @property
    def columns(self) -> int:
        return self._acc.columns

    def hessian(self) -> torch.Tensor:
        """The symmetric Hessian ``[columns, columns]`` (shares memory with the accumulator)."""
        return _t(self._acc.hessian())


@dataclass
class PackedGPTQ:
    """One Linear layer in the ``gptq`` checkpoint layout (see ``include/normtweak/pack.h``)."""

    qweight: torch.Tensor  # int32 [in * bits / 32, out]
    qzeros: torch.Tensor  # int32 [ngroups, out * bits / 32]
    scales: torch.Tensor  # float16 [ngroups, out]
    g_idx: torch.Tensor  # int32 [in]


def pack_gptq(result: QuantResult) -> PackedGPTQ:
    d = _core.pack_gptq(
        result.codes.contiguous(),
        result.scales.contiguous(),
        result.zeros.contiguous(),
        result.g_idx.contiguous(),
        result.bits,
    )
    return PackedGPTQ(_t(d["qweight"]), _t(d["qzeros"]), _t(d["scales"]), _t(d["g_idx"]))


def unpack_gptq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int
) -> dict:
    """Inverse of :func:`pack_gptq`: codes [out, in], scales/zeros [out, G] float32, g_idx [in]."""
    d = _core.unpack_gptq(
        qweight.contiguous(), qzeros.contiguous(), scales.contiguous(), g_idx.to(torch.int32).contiguous(), bits
    )
    return {k: _t(v) for k, v in d.items()}
