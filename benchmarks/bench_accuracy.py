"""Accuracy table on SmolLM2-135M-Instruct: float, RTN, RTN+NT, GPTQ, GPTQ+NT at
W4 per-channel, W3 g128 and W2 g64, on LAMBADA and held-out perplexity
(Austen's Persuasion), with quantization time and peak memory per row.
Writes docs/results.md.

    .venv/bin/python benchmarks/bench_accuracy.py                      # everything (hours on 2 cores)
    .venv/bin/python benchmarks/bench_accuracy.py --lambada-limit 300 --configs w3g128

The bundled weights already lie on a 4-bit grid with groups of 32 (Q4_1), so
4-bit is measured per channel only.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import resource
import time
from pathlib import Path

import torch

import normtweak as nt
from normtweak import eval as ev
from normtweak.calibration import generate_calibration, text_calibration
from normtweak.corpora import english_text
from normtweak.models import load_model

CONFIGS = {"w4": (4, -1), "w3g128": (3, 128), "w2g64": (2, 64)}
ROOT = Path(__file__).resolve().parent.parent


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="w4,w3g128,w2g64")
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--lambada-limit", type=int, default=None)
    ap.add_argument("--ppl-windows", type=int, default=40)
    ap.add_argument("--calib", default="generate", help="generate or text:NAME")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--tweak-lr", type=float, default=1e-5)
    ap.add_argument("--act-order", action="store_true", default=True)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results.md"))
    args = ap.parse_args()
    nt.set_num_threads(torch.get_num_threads())
    model, tok = load_model("smollm2-135m")
    if args.calib == "generate":
        calib = generate_calibration(model, tok, n=args.nsamples, seqlen=args.seqlen)
    else:
        calib = text_calibration(tok, english_text(args.calib[5:]), args.nsamples, args.seqlen)
    text = english_text("persuasion")

    def evaluate(m):
        lam = ev.lambada(m, tok, limit=args.lambada_limit)
        ppl = ev.perplexity(m, tok, text, seqlen=512, max_chunks=args.ppl_windows)
        return lam, ppl

    rows = []
    lam, ppl = evaluate(model)
    rows.append(("float", "-", lam, ppl, 0.0, peak_rss_gib()))
    print(rows[-1], flush=True)
    for cname in args.configs.split(","):
        bits, gs = CONFIGS[cname]
        for method in args.methods.split(","):
            for tweak in (None, nt.TweakConfig(lr=args.tweak_lr)):
                q = copy.deepcopy(model)
                cfg = nt.GPTQConfig(bits=bits, group_size=gs, method=method, act_order=args.act_order)
                t0 = time.perf_counter()
                nt.pipeline.quantize(q, calib, cfg, tweak)
                secs = time.perf_counter() - t0
                lam, ppl = evaluate(q)
                name = method.upper() + (" + NT" if tweak else "")
                rows.append((name, f"W{bits} " + ("per-channel" if gs < 0 else f"g{gs}"), lam, ppl, secs, peak_rss_gib()))
                print(rows[-1], flush=True)
                del q
    n = rows[0][2]["n"]
    lines = [
        "# Accuracy on SmolLM2-135M-Instruct",
        "",
        f"Generated {datetime.date.today()} by `.venv/bin/python benchmarks/bench_accuracy.py "
        f"--configs {args.configs} --methods {args.methods}"
        + (f" --lambada-limit {args.lambada_limit}" if args.lambada_limit else "")
        + f"` on 2 CPU cores. Calibration: {args.calib}, {args.nsamples} x {args.seqlen} tokens; "
        f"Norm Tweaking lr0 = {args.tweak_lr}, scale 5, one pass; GPTQ with act-order. "
        f"LAMBADA: {n} passages (last-word greedy accuracy, and perplexity of the last word); "
        f"perplexity on {args.ppl_windows} x 512 tokens of Persuasion. Peak memory is the process's peak RSS so far.",
        "",
        "| model | weights | LAMBADA acc | LAMBADA ppl | text ppl | quantize s | peak RSS GiB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, w, lam, ppl, secs, rss in rows:
        lines.append(f"| {name} | {w} | {lam['acc']:.4f} | {lam['ppl']:.2f} | {ppl['ppl']:.2f} | {secs:.0f} | {rss:.2f} |")
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
