"""Norm Tweaking after GPTQ on SmolLM2-135M: one GPTQ run, then post-step tweaks at several
learning rates/losses on the same weights, each judged on LAMBADA and on held-out KL / top-1
agreement with the float model (8 x 256 self-generated tokens, seed 1
8 x 256 tokens of Emma).
The numbers in docs/findings.md ("Inside the walk or after it", "W2 g64") come from:

  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/exp_post_step.py --tag w3 \
      --variants 1e-5:dist,1e-4:dist
  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/exp_post_step.py --tag w2 \
      --bits 2 --gs 64 --nlam 500 --variants 1e-5:dist,1e-3:dist,1e-4:dist

Rows are appended to /tmp/exp/results2_TAG.jsonl
the GPTQ weights are cached in /tmp/exp.
"""
import argparse
import copy
import json
import os
import time
import torch
import normtweak as nt
from normtweak import eval as ev
from normtweak.calibration import cached_calibration, text_calibration
from normtweak.corpora import english_text
from normtweak.models import load_model

ap = argparse.ArgumentParser()
ap.add_argument("--bits", type=int, default=3)
ap.add_argument("--gs", type=int, default=128)
ap.add_argument("--variants", default="1e-5:dist,1e-4:dist")
ap.add_argument("--nlam", type=int, default=None)
ap.add_argument("--tag", default="x")
ap.add_argument("--calib", default="generate")
a = ap.parse_args()
nt.set_num_threads(torch.get_num_threads())
model, tok = load_model("smollm2-135m")
calib = cached_calibration(model, tok, a.calib, 64, 256, 0, progress=False)
hold_gen = cached_calibration(model, tok, "generate", 8, 256, 1, progress=False)
hold_txt = text_calibration(tok, english_text("emma"), 8, 256, seed=1)
os.makedirs("/tmp/exp", exist_ok=True)
out = f"/tmp/exp/results2_{a.tag}.jsonl"


@torch.no_grad()
def agree(m, ids):
    kl = 0.0
    top = 0
    n = 0
    for i in range(ids.shape[0]):
        x = ids[i:i+1]
        lf = torch.log_softmax(model(input_ids=x).logits.float(), -1)[0]
        lq = torch.log_softmax(m(input_ids=x).logits.float(), -1)[0]
        kl += (lf.exp() * (lf - lq)).sum().item()
        top += (lf.argmax(-1) == lq.argmax(-1)).sum().item()
        n += x.shape[1]
    return kl / n, top / n


def evaluate(name, m, secs=0.0):
    kg, ag = agree(m, hold_gen)
    kt, at = agree(m, hold_txt)
    r = dict(name=name, kl_gen=kg, top1_gen=ag, kl_txt=kt, top1_txt=at, secs=secs)
    print(json.dumps(r), flush=True)
    lam = ev.lambada(m, tok, limit=a.nlam, progress=False)
    r.update(acc=lam["acc"], wppl=lam["ppl"], n=lam["n"])
    print(json.dumps(r), flush=True)
    with open(out, "a") as fh:
        fh.write(json.dumps(r) + "\n")


cfg = nt.GPTQConfig(bits=a.bits, group_size=a.gs, act_order=True, sym=False)
q = copy.deepcopy(model)
sp = f"/tmp/exp/gptq_w{a.bits}g{a.gs}_{a.calib.replace(':','_')}.pt"
if os.path.exists(sp):
    q.load_state_dict(torch.load(sp))
    print("loaded", sp, flush=True)
else:
    t0 = time.time()
    nt.pipeline.quantize(q, calib, cfg, None, progress=False)
    torch.save(q.state_dict(), sp)
    evaluate(f"gptq w{a.bits}g{a.gs} {a.calib}", q, time.time() - t0)
orig = {k: v.clone() for k, v in q.state_dict().items() if "norm" in k}
for v in [s for s in a.variants.split(",") if s and s != "base"]:
    lr, loss = v.split(":")
    q.load_state_dict(orig, strict=False)
    t0 = time.time()
    rep = nt.tweak(model, q, calib, nt.TweakConfig(lr=float(lr), loss=loss), progress=False)
    rb = sum(b["tweak"]["rolled_back"] for b in rep.blocks)
    evaluate(f"post-step nt lr={lr} loss={loss} calib={a.calib} rolled_back={rb}", q, time.time() - t0)
