"""Hessian accumulation and GPTQ: normtweak's C++ core against the machine's GEMM
ceiling and a straightforward PyTorch implementation of the reference GPTQ.

Variants are interleaved within each layer (these machines are noisy), each
time is the best of --reps runs, and the table goes to stdout and to
docs/benchmarks.md. Run it with OpenBLAS's core-type overrides unset:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/bench_core.py
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import normtweak as nt
from normtweak.reference import gptq_torch

ROOT = Path(__file__).resolve().parent.parent
SHAPES = [(768, 768), (3072, 768), (768, 3072), (2048, 2048), (4096, 4096), (11008, 4096)]
VARIANTS = [("channel", -1, False), ("channel+act", -1, True), ("g128", 128, False), ("g128+act", 128, True)]


def gemm_rate(kind: str, M: int, N: int, K: int, threads: int, build: Path) -> float:
    exe = build / "benchmarks" / f"gemm_rate_{kind}"
    if not exe.exists():
        sys.exit(f"{exe} is missing: build first (make build)")
    out = subprocess.run([str(exe), str(M), str(N), str(K), "3", str(threads)], check=True, capture_output=True, text=True)
    return float(out.stdout.strip())


def best_time(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def layer_inputs(out_f: int, in_f: int, tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    # Correlated activations with a few outlier channels, as a transformer's.
    r = max(16, in_f // 8)
    X = torch.randn(tokens, r, generator=g) @ torch.randn(r, in_f, generator=g) / r**0.5
    X += 0.1 * torch.randn(tokens, in_f, generator=g)
    X[:, torch.randint(0, in_f, (8,), generator=g)] *= 20
    W = 0.02 * torch.randn(out_f, in_f, generator=g)
    return X, W


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES), help="out x in, comma separated")
    ap.add_argument("--build", default=str(ROOT / "build"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args()

    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if var in os.environ:
            print(f"warning: {var} is set; OpenBLAS GEMM runs at about half speed. Unset it for this command.")
    torch.set_num_threads(args.threads)
    nt.set_num_threads(args.threads)
    build = Path(args.build)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]

    hess_rows, gptq_rows = [], []
    for out_f, in_f in shapes:
        X, W = layer_inputs(out_f, in_f, args.tokens, seed=out_f * 7 + in_f)
        print(f"== layer {out_f}x{in_f}, {args.tokens} tokens", flush=True)
        # GEMM ceiling with the Hessian's shape [in x T] x [T x in], both engines, interleaved with the Hessian runs.
        rates = {"eigen": 0.0, "blas": 0.0}
        t_h, t_ht = float("inf"), float("inf")
        acc = nt.HessianAccumulator(in_f)
        for _ in range(2):
            for kind in rates:
                rates[kind] = max(rates[kind], gemm_rate(kind, in_f, in_f, args.tokens, args.threads, build))

            def run_ours():
                acc._acc.reset()
                acc.add_batch(X)

            def run_torch():
                gptq_torch.add_batch(torch.zeros(in_f, in_f), 0, X)

            t_h = min(t_h, best_time(run_ours, args.reps))
            t_ht = min(t_ht, best_time(run_torch, args.reps))
        ceiling = max(rates.values())
        H = acc.hessian().clone()
        hflops = float(in_f) * in_f * args.tokens  # symmetric rank-k: n(n+1)/2 dot products of length T, 2 flops each
        hess_rows.append((f"{out_f}x{in_f}", t_h, hflops / t_h / 1e9, rates["eigen"], rates["blas"],
                          hflops / t_h / 1e9 / ceiling, t_ht, t_ht / t_h))
        print(f"   hessian {t_h:.3f}s = {hflops / t_h / 1e9:.0f} GFLOP/s ({hflops / t_h / 1e9 / ceiling:.0%} of the "
              f"GEMM ceiling {ceiling:.0f}; eigen {rates['eigen']:.0f}, blas {rates['blas']:.0f}), torch {t_ht:.3f}s",
              flush=True)

        # GPTQ flops: the triangular error propagation (m n^2) plus Cholesky and triangular inverse (2/3 n^3).
        gflops = (float(out_f) * in_f * in_f + 2.0 / 3.0 * in_f**3) / 1e9
        for name, gs, act in VARIANTS:
            t_o, t_t = float("inf"), float("inf")
            for _ in range(args.reps):  # interleave ours and torch's
                t_o = min(t_o, best_time(lambda: nt.gptq_quantize(W, H, bits=4, group_size=gs, act_order=act), 1))
                t_t = min(t_t, best_time(lambda: gptq_torch.gptq(W, H, bits=4, group_size=gs, act_order=act), 1))
            gptq_rows.append((f"{out_f}x{in_f}", name, t_o, gflops / t_o, gflops / t_o / ceiling, t_t, t_t / t_o))
            print(f"   gptq {name:12s} {t_o:7.3f}s ({gflops / t_o:5.0f} GFLOP/s, {gflops / t_o / ceiling:4.0%} of "
                  f"ceiling) torch {t_t:7.3f}s  speed-up {t_t / t_o:4.1f}x", flush=True)

    lines = [
        "# Benchmarks: Hessian accumulation and GPTQ",
        "",
        f"Generated {datetime.date.today()} by `make bench` "
        f"(`env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/bench_core.py`)",
        f"on {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads for every "
        f"engine, {args.tokens} calibration tokens, torch {torch.__version__}. Best of {args.reps} runs, variants "
        "interleaved.",
        "",
        "GEMM ceiling: the faster of Eigen's own float32 GEMM and OpenBLAS's `sgemm` on the Hessian's shape "
        "`[in x T] * [T x in]`. Hessian flops count the symmetric rank-k update's real work, `in^2 * T`.",
        "",
        "| layer | Hessian s | GFLOP/s | Eigen GEMM | OpenBLAS GEMM | of ceiling | torch `X^T X` s | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in hess_rows:
        lines.append(f"| {r[0]} | {r[1]:.3f} | {r[2]:.0f} | {r[3]:.0f} | {r[4]:.0f} | {r[5]:.0%} | {r[6]:.3f} | {r[7]:.1f}x |")
    lines += [
        "",
        "GPTQ at 4 bits; flops counted as `out * in^2` (error propagation) `+ 2/3 in^3` (Cholesky and inverse). "
        "torch: `normtweak/reference/gptq_torch.py`, the reference `fasterquant` in float32 PyTorch.",
        "",
        "| layer | variant | normtweak s | GFLOP/s | of ceiling | torch s | speed-up |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in gptq_rows:
        lines.append(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.0f} | {r[4]:.0%} | {r[5]:.3f} | {r[6]:.1f}x |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
