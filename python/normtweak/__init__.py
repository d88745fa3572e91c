"""normtweak: low-bit post-training quantization of LLMs (GPTQ, RTN) and Norm Tweaking.

The compiled core lives in :mod:`normtweak._core`; this package wraps it for
PyTorch users. Tensors cross by DLPack without copies.
"""

from __future__ import annotations

import atexit
import logging

from . import _core
from ._core import num_threads, set_num_threads
from .api import quantize, tweak
from .calibration import generate_calibration, text_calibration
from .core import (
    ActAbsMax,
    HessianAccumulator,
    PackedGPTQ,
    QuantResult,
    gptq_quantize,
    pack_gptq,
    rtn_quantize,
    smooth_factors,
    smoothquant_quantize,
    unpack_gptq,
)
from . import export, pipeline
from .pipeline import GPTQConfig
from .tweak import TweakConfig, channel_dist_loss, tweak_block

__version__ = _core.__version__

_logger = logging.getLogger("normtweak")


def _log_from_core(level: int, message: str) -> None:
    _logger.log(level, message)


_core.set_log_handler(_log_from_core)
# The C++ side holds a reference to the handler; drop it while the interpreter
# is still alive, not in a static destructor after it has finalized.
atexit.register(_core.set_log_handler, None)

__all__ = [
    "GPTQConfig",
    "TweakConfig",
    "channel_dist_loss",
    "generate_calibration",
    "quantize",
    "text_calibration",
    "tweak",
    "tweak_block",
    "ActAbsMax",
    "HessianAccumulator",
    "PackedGPTQ",
    "QuantResult",
    "gptq_quantize",
    "num_threads",
    "pack_gptq",
    "rtn_quantize",
    "set_num_threads",
    "smooth_factors",
    "smoothquant_quantize",
    "unpack_gptq",
]
