"""The `normtweak` command line: quantize, tweak (post-step) and eval."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from .tweak import LOSSES, TweakConfig

log = logging.getLogger("normtweak")


def _add_tweak_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tweak-lr", default="1e-5",
                   help="lr0 of the layer schedule (paper eq. 3); 'auto' or a comma-separated list searches lr0 on "
                        "held-out calibration samples (lowest KL to the float model wins)")
    p.add_argument("--tweak-scale", type=float, default=5.0, help="lr_i = lr0 * (1 + scale * i / L)")
    p.add_argument("--tweak-passes", type=int, default=1, help="passes over the calibration set (0: no per-block tweak, only --kl-tweak's stage)")
    p.add_argument("--loss", choices=LOSSES, default="dist",
                   help="dist: the paper's eq. 2; reldist: eq. 2 per channel in units of the float channel's spread; "
                        "mse, kl: the paper's Table 9 ablation")
    p.add_argument("--tweak-order", choices=("walk", "after"), default="walk",
                   help="walk: tweak each block right after quantizing it (paper, Algorithm 1); after: quantize "
                        "all blocks first, then tweak (keeps a float copy of the model; see docs/findings.md)")
    p.add_argument("--tweak-target", choices=("local", "float"), default="local",
                   help="local: tweak each block toward the float block's output on the quantized activations "
                        "(paper, Algorithm 1); float: toward the float model's own activations, so the norms also "
                        "absorb the error of the blocks before (see docs/findings.md)")
    p.add_argument("--tweak-skip-first", type=int, default=0, metavar="N",
                   help="leave the first N positions of every sample out of the tweak's loss (1: the attention-sink "
                        "token, whose massive activations otherwise dominate the channel variances)")
    p.add_argument("--kl-tweak", choices=("off", "final", "all"), default="off",
                   help="after the block walk, tweak the final norm or every norm toward the float model's next-token "
                        "distribution (KL, end to end; not in the paper, see docs/findings.md)")
    p.add_argument("--kl-lr", type=float, default=TweakConfig.kl_lr, help="Adam's rate for --kl-tweak")
    p.add_argument("--kl-passes", type=int, default=TweakConfig.kl_passes,
                   help="passes over the calibration set for --kl-tweak")
    p.add_argument("--kl-judge", type=int, default=TweakConfig.kl_judge, metavar="N",
                   help="calibration samples (evenly spread) on which --kl-tweak's KL is measured before and after, "
                        "to decide the rollback; 0: all")
    p.add_argument("--tweak-holdout", type=float, default=0.0,
                   help="fraction of calibration samples that only judge each block's tweak (rollback decision); "
                        "with a learning-rate search, the fraction held out to judge each lr0 (default 1/8)")


def _add_calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default="generate",
                   help="'generate' (self-generated, paper), a text file, or text:NAME (emma, persuasion, ...)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)


def _calibration(args, model, tok) -> torch.Tensor:
    from .calibration import cached_calibration

    return cached_calibration(model, tok, args.calib, args.nsamples, args.seqlen, seed=args.seed)


def _parse_lr(text: str) -> tuple[float, tuple]:
    """--tweak-lr: one lr0, 'auto' (the default search grid) or a comma-separated grid."""
    from .search import DEFAULT_GRID

    if text == "auto":
        return DEFAULT_GRID[0], DEFAULT_GRID
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--tweak-lr {text!r} is not a number, 'auto' or a comma-separated list of numbers") from None
    if not values:
        raise ValueError("--tweak-lr is empty")
    return values[0], (tuple(values) if len(values) > 1 else ())


def _tweak_config(args):
    from .tweak import TweakConfig

    lr, grid = _parse_lr(args.tweak_lr)
    return TweakConfig(lr=lr, scale=args.tweak_scale, passes=args.tweak_passes, loss=args.loss,
                       holdout=args.tweak_holdout, lr_grid=grid, order=getattr(args, "tweak_order", "walk"),
                       target=args.tweak_target, skip_first=args.tweak_skip_first, kl_norms=args.kl_tweak,
                       kl_lr=args.kl_lr, kl_passes=args.kl_passes, kl_judge=args.kl_judge)


def _kl_cell(f: dict) -> str:
    return (f"{f['loss_before']:.4g} -> {f['loss_after']:.4g} nats on {f['judged']} samples"
            + (" (rolled back)" if f["rolled_back"] else ""))


def _summary(report, out: Path, seconds: float) -> None:
    blocks = report.blocks
    fallbacks = [f for b in blocks for f in b["fallbacks"]]
    rolled = [b["index"] for b in blocks if b["tweak"] and b["tweak"]["rolled_back"]]
    rows = [
        ("blocks", str(len(blocks))),
        ("mean |d mu| before tweak", f"{sum(b['delta_mu_before_tweak'] for b in blocks) / len(blocks):.4g}"),
        ("mean |d mu| after", f"{sum(b['delta_mu'] for b in blocks) / len(blocks):.4g}"),
        ("mean |d var| before tweak", f"{sum(b['delta_var_before_tweak'] for b in blocks) / len(blocks):.4g}"),
        ("mean |d var| after", f"{sum(b['delta_var'] for b in blocks) / len(blocks):.4g}"),
        ("tweak rolled back", ", ".join(map(str, rolled)) or "none"),
        *([(f"KL tweak ({report.tweak['kl_norms']}): next-token KL", _kl_cell(report.kl_tweak))]
          if report.kl_tweak else []),
        ("RTN fallbacks", ", ".join(fallbacks) or "none"),
        ("time", f"{seconds:.1f} s"),
        ("output", str(out)),
    ]
    if report.lr_search:
        srch = report.lr_search
        table = ", ".join(f"{lr:g}: {kl:.4f}" for lr, kl in srch["table"])
        rows.insert(0, ("lr0 search (held-out KL)", f"untweaked {srch['kl_untweaked']:.4f}; {table}"))
        rows.insert(1, ("lr0 chosen", "none (norms left untweaked)" if srch["lr"] is None else f"{srch['lr']:g}"))
    w = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k:<{w}}  {v}")


def cmd_quantize(args) -> int:
    from . import export
    from .models import load_model
    from .pipeline import GPTQConfig, quantize

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    if args.alpha == "search":
        alpha = None
    else:
        try:
            alpha = float(args.alpha)
        except ValueError:
            raise ValueError(f"--alpha {args.alpha!r} is not a number in [0, 1] or 'search'") from None
    cfg = GPTQConfig(bits=args.wbits, group_size=args.group_size, sym=args.sym, act_order=args.act_order,
                     mse=args.clip_search, method=args.method, abits=args.abits, alpha=alpha,
                     weight_method=args.weight_method, act_static=args.act_static, smooth_linear=args.smooth_linear)
    if cfg.abits < 16 and args.format == "gptq":
        raise ValueError(f"--abits {cfg.abits} quantizes activations, which the GPTQ format cannot record; "
                         "add --format fake")
    model, tok = load_model(args.model)
    tweak = _tweak_config(args) if args.tweak else None
    calib = _calibration(args, model, tok)
    out = Path(args.out)
    searching = tweak is not None and (bool(tweak.lr_grid) or tweak.order == "after")
    if args.resume and (searching or args.no_checkpoint):
        raise ValueError("--resume needs per-block checkpoints, which --no-checkpoint, --tweak-order after and the "
                         "learning-rate search (--tweak-lr auto or a list) turn off")
    ckpt = None if searching or args.no_checkpoint else export.staging_dir(out) / export.RESUME
    report = quantize(model, calib, cfg, tweak, checkpoint=ckpt, resume=args.resume)
    # Only what the run determines goes into the checkpoint (no timings), so that the same command with
    # the same seed and threads writes the same bytes.
    extra = {"report": {"config": report.config, "tweak": report.tweak, "lr_search": report.lr_search},
             "calibration": {"source": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed}}
    if args.format == "gptq":
        export.save_gptq(model, tok, out, extra)
    else:
        export.save_fake(model, tok, out, extra)
    if args.report:
        from .report import write_report

        write_report(report, args.report)
    _summary(report, out, time.perf_counter() - t0)
    return 0


def cmd_tweak(args) -> int:
    from . import export
    from .models import load_model
    from .pipeline import GPTQConfig, quantize

    t0 = time.perf_counter()
    fmodel, tok = load_model(args.float)
    qmodel, qtok, packed = export.load_quantized(args.quantized)
    calib = _calibration(args, fmodel, tok)
    report = quantize(qmodel, calib, GPTQConfig(), _tweak_config(args), float_model=fmodel)
    out = Path(args.out)
    if packed:
        from safetensors.torch import load_file, save_file

        src = Path(args.quantized)
        out_, tmp = export._atomic_dir(out)
        tensors = {}
        for f in sorted(src.glob("*.safetensors")):
            tensors.update(load_file(str(f)))
        state = qmodel.state_dict()
        for k in tensors:
            if k in state and not any(k.startswith(p + ".") for p in packed):
                tensors[k] = state[k].detach().contiguous().clone()
        save_file(tensors, str(tmp / export.WEIGHTS), metadata={"format": "pt"})
        for f in src.iterdir():
            if f.suffix != ".safetensors" and f.is_file():
                (tmp / f.name).write_bytes(f.read_bytes())
        export._finish(tmp, out_)
    else:
        export.save_fake(qmodel, qtok or tok, out)
    _summary(report, out, time.perf_counter() - t0)
    return 0


def cmd_eval(args) -> int:
    from . import eval as ev
    from .export import load_quantized
    from .models import BUNDLED, load_model

    p = Path(args.model)
    if args.model in BUNDLED or args.model.endswith(".gguf"):
        model, tok = load_model(args.model)
    else:
        model, tok, _ = load_quantized(p)
        if tok is None:
            raise ValueError(f"{p} has no tokenizer files")
    results = {}
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        if task == "lambada":
            results[task] = ev.lambada(model, tok, limit=args.limit)
        elif task == "ppl" or task.startswith("ppl:"):
            from .corpora import english_text

            name = task.split(":", 1)[1] if ":" in task else "persuasion"
            results[task] = ev.perplexity(model, tok, english_text(name), seqlen=512, max_chunks=args.limit)
        elif task in ev.MC_TASKS:
            results[task] = ev.multiple_choice(model, tok, task, limit=args.limit)
        else:
            raise ValueError(f"unknown task {task!r}; available: lambada, ppl, ppl:NAME, {', '.join(ev.MC_TASKS)}")
    w = max(len(t) for t in results)
    for task, r in results.items():
        print(f"{task:<{w}}  " + "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    if args.json:
        out = Path(args.json)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="normtweak", description="Low-bit quantization with Norm Tweaking")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch and normtweak")
    sub = ap.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a model (GPTQ, RTN or SmoothQuant), optionally with Norm Tweaking")
    q.add_argument("--model", required=True, help="local HF folder, a .gguf file, or smollm2-135m")
    q.add_argument("--out", required=True)
    q.add_argument("--method", choices=("rtn", "gptq", "smoothquant"), default="gptq")
    q.add_argument("--abits", type=int, default=16,
                   help="activation bits (per-token dynamic, simulated); 16 keeps activations in float")
    q.add_argument("--smooth-linear", action=argparse.BooleanOptionalAction, default=None,
                   help="SmoothQuant: also smooth v_proj -> o_proj and up_proj -> down_proj (default: when abits <= "
                        "wbits)")
    q.add_argument("--act-static", action="store_true",
                   help="static per-tensor activation scales from the calibration maxima instead of per-token ones")
    q.add_argument("--alpha", default="0.5", help="SmoothQuant migration strength in [0, 1], or 'search' (per pair)")
    q.add_argument("--weight-method", choices=("rtn", "gptq"), default="rtn",
                   help="weight quantizer under --method smoothquant")
    q.add_argument("--wbits", type=int, default=4)
    q.add_argument("--group-size", type=int, default=128)
    g = q.add_mutually_exclusive_group()
    g.add_argument("--sym", dest="sym", action="store_true", default=True)
    g.add_argument("--asym", dest="sym", action="store_false")
    q.add_argument("--act-order", action="store_true")
    q.add_argument("--clip-search", action="store_true",
                   help="shrink each group's [min, max] range to the one with the smallest weight error before "
                        "quantizing (reference GPTQ's and GPTQModel's `mse` option; helps most at 2-3 bits)")
    q.add_argument("--tweak", action="store_true", help="tweak the norms after quantizing each block")
    _add_tweak_args(q)
    _add_calib_args(q)
    q.add_argument("--format", choices=("gptq", "fake"), default="gptq")
    q.add_argument("--resume", action="store_true",
                   help="continue a killed run from its last completed block (checkpoints in OUT.tmp/resume)")
    q.add_argument("--no-checkpoint", action="store_true",
                   help="do not write per-block checkpoints (they take about the model's size on disk)")
    q.add_argument("--report", help="write a per-block plot (paper Figure 1) to this PNG path")
    q.set_defaults(fn=cmd_quantize)

    t = sub.add_parser("tweak", help="post-step: tweak the norms of an existing quantized checkpoint")
    t.add_argument("--float", required=True)
    t.add_argument("--quantized", required=True)
    t.add_argument("--out", required=True)
    _add_tweak_args(t)
    _add_calib_args(t)
    t.set_defaults(fn=cmd_tweak)

    e = sub.add_parser("eval", help="evaluate a model or checkpoint")
    e.add_argument("--model", required=True)
    e.add_argument("--tasks", default="lambada,ppl", help="comma-separated: lambada, ppl, ppl:NAME (an English text: "
                   "persuasion, emma, mobydick, ...), piqa, arc_easy, arc_challenge, hellaswag, winogrande, boolq, openbookqa")
    e.add_argument("--limit", type=int, default=None, help="first N passages (lambada), questions (multiple choice) or windows (ppl)")
    e.add_argument("--json")
    e.set_defaults(fn=cmd_eval)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from . import set_num_threads

    set_num_threads(torch.get_num_threads())
    try:
        return args.fn(args)
    except ValueError as e:
        print(f"normtweak: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
