"""Held-out channel-distribution loss (eq. 2) of the first 4 blocks of SmolLM2-135M at W3 g128, quantized
(GPTQ or RTN) then post-step tweaked at the paper's rate, calibrated on 64 x 256 tokens of Emma's first half,
judged on Emma's second half and on Persuasion with 8 and 32 held-out windows. The setting of
tests/python/test_real_model.py, printed per block as "quantized -> tweaked" (docs/findings.md, "Does the tweak
generalize?"):

  .venv/bin/python benchmarks/exp_held_out.py --threads 1 --methods gptq,rtn
"""
import argparse
import copy

import torch

import normtweak as nt
from normtweak.calibration import text_calibration
from normtweak.corpora import english_text
from normtweak.models import keep_first_blocks, load_model

BLOCKS = 4

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--methods", default="gptq,rtn")
args = ap.parse_args()
torch.set_num_threads(args.threads)
nt.set_num_threads(args.threads)

model, tok = load_model("smollm2-135m")
keep_first_blocks(model, BLOCKS)
emma, persuasion = english_text("emma"), english_text("persuasion")
half = len(emma) // 2
calib = text_calibration(tok, emma[:half], n=64, seqlen=256, seed=0)


def block_outputs(m, ids):
    with torch.no_grad():
        return m(input_ids=ids, output_hidden_states=True).hidden_states[1:BLOCKS]


def per_sample_loss(quant, ref):
    return sum(nt.channel_dist_loss(q, f).item() for q, f in zip(quant, ref)) / len(ref)


for method in args.methods.split(","):
    plain = copy.deepcopy(model)
    nt.pipeline.quantize(plain, calib, nt.GPTQConfig(bits=3, group_size=128, act_order=True, method=method), None,
                         progress=False)
    tweaked = copy.deepcopy(plain)
    nt.tweak(model, tweaked, calib, nt.TweakConfig(lr=1e-5, rollback=False), progress=False)
    for name, text in (("emma, 2nd half", emma[half:]), ("persuasion", persuasion)):
        for n in (8, 32):
            held = text_calibration(tok, text, n=n, seqlen=256, seed=1)
            f = block_outputs(model, held)
            cells = [f"{per_sample_loss(p, t):.4f} -> {per_sample_loss(q, t):.4f}"
                     for p, q, t in zip(block_outputs(plain, held), block_outputs(tweaked, held), f)]
            print(f"{method:5s} {name:15s} n={n:2d}  " + "   ".join(cells), flush=True)
