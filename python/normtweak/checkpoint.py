"""Per-block checkpoints of the block walker, so that a killed run resumes
from the last completed block and ends with the same result.

The folder (by default `OUT.tmp/resume/` of the CLI's output) holds:
  manifest.json       what the run is: a fingerprint of the model, the
                      calibration ids and the settings; a resume under other
                      settings is refused, naming them
  block_NNNN.pt       the block's state after quantizing and tweaking (weights,
                      norms), its per-layer quantization results (for export)
                      and its statistics
  inputs.pt           the activations entering the next block, and its index
                      (with tweak target "float", the float model's too)
Every file is written to a temporary name and renamed, so a kill leaves either
the previous or the new version, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from .models import save_atomic

log = logging.getLogger("normtweak")


def fingerprint(model, calib: torch.Tensor, config, tweak) -> dict:
    from .models import model_fingerprint

    return {
        "model": model_fingerprint(model),
        "calibration": hashlib.sha1(calib.contiguous().numpy().tobytes()).hexdigest(),
        "config": asdict(config),
        "tweak": asdict(tweak) if tweak is not None else None,
        "threads": torch.get_num_threads(),
    }


class BlockCheckpoint:
    def __init__(self, folder: str | Path, fp: dict):
        self.folder = Path(folder)
        self.fp = fp

    def start(self, resume: bool) -> None:
        """A fresh folder, or (resume) check that the one there belongs to this run."""
        manifest = self.folder / "manifest.json"
        if resume and manifest.exists():
            old = json.loads(manifest.read_text())
            diff = [k for k in self.fp if json.dumps(old.get(k), sort_keys=True) != json.dumps(self.fp[k], sort_keys=True)]
            if diff:
                raise ValueError(f"cannot resume from {self.folder}: it was written with other {', '.join(diff)} "
                                 f"(was {[old.get(k) for k in diff]}, now {[self.fp[k] for k in diff]}); run with "
                                 "the same settings, or without --resume to start over")
            return
        if resume:
            log.warning("--resume: no checkpoint in %s; starting from the first block", self.folder)
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        tmp = manifest.with_name("manifest.json.tmp")
        tmp.write_text(json.dumps(self.fp, indent=1, sort_keys=True))
        tmp.replace(manifest)

    def save_block(self, index: int, block: torch.nn.Module, stats: dict, next_inputs: list[torch.Tensor],
                   float_inputs: Optional[list[torch.Tensor]] = None) -> None:
        quant = {name: mod._normtweak_quant for name, mod in block.named_modules()
                 if getattr(mod, "_normtweak_quant", None) is not None}
        acts = {name: (mod._normtweak_abits, mod._normtweak_act_scale) for name, mod in block.named_modules()
                if getattr(mod, "_normtweak_abits", 16) < 16}
        save_atomic({"state": block.state_dict(), "quant": quant, "acts": acts, "stats": stats},
              self.folder / f"block_{index:04d}.pt")
        save_atomic({"next": index + 1, "inputs": next_inputs, "float_inputs": float_inputs},
                    self.folder / "inputs.pt")

    def restore(self, layers) -> tuple[int, Optional[list[torch.Tensor]], list[dict], Optional[list[torch.Tensor]]]:
        """Load the completed blocks into `layers`; (first block to run, its inputs, the restored stats, the float
        model's inputs to it or None)."""
        path = self.folder / "inputs.pt"
        if not path.exists():
            return 0, None, [], None
        saved = torch.load(path, weights_only=False)
        start = int(saved["next"])
        stats = []
        for i in range(start):
            blk = torch.load(self.folder / f"block_{i:04d}.pt", weights_only=False)
            layers[i].load_state_dict(blk["state"])
            for name, r in blk["quant"].items():
                layers[i].get_submodule(name)._normtweak_quant = r
            for name, (bits, scale) in blk.get("acts", {}).items():
                from .smoothquant import attach_act_quant

                attach_act_quant(layers[i].get_submodule(name), bits, scale)
            stats.append(blk["stats"])
        log.warning("resuming from %s: blocks 0..%d restored", self.folder, start - 1)
        return start, saved["inputs"], stats, saved.get("float_inputs")
