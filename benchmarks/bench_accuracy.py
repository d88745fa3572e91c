"""Accuracy table on SmolLM2-135M-Instruct: float, RTN, RTN+NT, GPTQ, GPTQ+NT at
W4 per-channel, W3 g128 and W2 g64, on LAMBADA (all 5153 passages by default),
held-out perplexity (Austen's Persuasion), PIQA and ARC-Easy, with quantization
time and peak memory per row; and the paper's ablations of the tweak loss
(Table 9: dist, mse, kl) and of the number of passes (Table 6: 1, 2, 5) on
GPTQ W3 g128; and SmoothQuant rows (W8A8, W4A8 with RTN or GPTQ weights,
W4A4, with and without NT; --rows smoothquant). Writes docs/results.json and
docs/results.md.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/bench_accuracy.py
    .venv/bin/python benchmarks/bench_accuracy.py --rows float,gptq-w3g128,gptq-w3g128-nt --lambada-limit 500
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/bench_accuracy.py --rows float,smoothquant \
        --sym --lambada-limit 500 --ppl-windows 10 --mc-tasks "" --store docs/results_smoothquant.json \
        --out docs/results_smoothquant.md

One row alone, with its per-passage LAMBADA results, and rows paired passage by passage (McNemar):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_accuracy.py \
        --run-row gptqmse-w3g128-nt --row-out docs/runs/ROW.json --no-sym --mc-tasks ""
    .venv/bin/python benchmarks/bench_accuracy.py --pair docs/runs/BASE.json docs/runs/ROW.json ...

Post-step rows (`-nt-order=after`: GPTQ first, then the tweak on the finished weights) can share one GPTQ run
(`--weights-cache DIR`) and tweak on another calibration than GPTQ's (`--tweak-calib text:emma`):

    ... --run-row gptqmse-w3g128-nt-order=after-lr=0.0001 --weights-cache ~/.cache/normtweak/bench-weights \
        --tweak-calib text:emma --row-out docs/runs/ROW.json

results.md also carries the SmoothQuant store's table as a section. Run each
row process on one thread (OMP_NUM_THREADS=1) when two benchmarks share the 2
cores: two 2-thread processes on 2 cores ran 3-5x slower than one thread each.
Two invocations may fill one store at once (give them different --rows): rows
are merged into the store under a lock as each finishes.

Every row runs in its own process (so its peak RSS is its own) and is stored in
docs/results.json as soon as it finishes; a rerun skips rows already stored
with the same settings, so the table can be filled over several runs (the
whole table takes hours on 2 cores). The bundled weights already lie on a
4-bit grid with groups of 32 (Q4_1), so 4-bit is measured per channel only.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import fcntl
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"w4": (4, -1), "w3g128": (3, 128), "w2g64": (2, 64)}
# Weight-activation settings (weights per channel; activations per token): SmoothQuant's rows.
ACT_CONFIGS = {"w8a8": (8, -1, 8), "w4a8": (4, -1, 8), "w4a4": (4, -1, 4)}
# row prefix -> (method, weight quantizer, clipping search on the weight grid, name in the table)
METHODS = {"rtn": ("rtn", "rtn", False, "RTN"), "gptq": ("gptq", "gptq", False, "GPTQ"),
           "sq": ("smoothquant", "rtn", False, "SmoothQuant (RTN weights)"),
           "sqgptq": ("smoothquant", "gptq", False, "SmoothQuant (GPTQ weights)"),
           "gptqmse": ("gptq", "gptq", True, "GPTQ, clip search")}
MAIN_ROWS = ["float"] + [f"{m}-{c}{t}" for c in CONFIGS for m in ("rtn", "gptq") for t in ("", "-nt")]
ABLATION_ROWS = ["gptq-w3g128-nt-loss=mse", "gptq-w3g128-nt-loss=kl", "gptq-w3g128-nt-passes=2",
                 "gptq-w3g128-nt-passes=5"]
# The stores results.md carries as sections after its own table, with their titles.
ALSO_STORES = {"results_recommended.json": "Clip search and the KL stage (the settings that work at 2 and 3 bits)",
               "results_smoothquant.json": "SmoothQuant (weight and activation quantization)"}
RECOMMENDED_ROWS = ["float"] + [f"gptqmse-{c}{t}" for c in ("w3g128", "w2g64")
                                for t in ("", "-nt-order=after", "-nt-order=after-kl_norms=all-kl_lr=0.001")]
# Row keys the table spells out in words (the rest show as "key value").
TWEAK_WORDS = {("order", "after"): "post-step", ("kl_norms", "all"): "+ KL stage (all norms)",
               ("kl_norms", "final"): "+ KL stage (final norm)"}
SMOOTHQUANT_ROWS = ["sq-w8a8", "sq-w8a8-nt", "sq-w4a8", "sqgptq-w4a8", "sq-w4a8-nt", "sqgptq-w4a8-nt", "sq-w4a4"]


def parse_row(name: str) -> dict:
    """"gptq-w3g128-nt-passes=2" -> {"method": "gptq", "bits": 3, "group_size": 128, "tweak": {"passes": 2}}.

    The tweak keys are TweakConfig's: lr, scale, passes, loss, order (walk: inside the walk, Algorithm 1; after:
    a post-step on the finished quantized weights), target (local: Algorithm 1; float: the float model's own
    activations), skip_first (positions left out of the loss), kl_norms (final|all: a second stage on the
    next-token KL), kl_lr, kl_passes."""
    if name == "float":
        return {"method": "float"}
    parts = name.split("-")
    configs = {**{k: (*v, 16) for k, v in CONFIGS.items()}, **ACT_CONFIGS}
    if len(parts) < 2 or parts[0] not in METHODS or parts[1] not in configs:
        raise SystemExit(f"row {name!r}: expected float or ({'|'.join(METHODS)})-({'|'.join(configs)})"
                         "[-nt[-key=value...]]")
    bits, gs, abits = configs[parts[1]]
    method, weights, mse, label = METHODS[parts[0]]
    row = {"method": method, "weight_method": weights, "mse": mse, "bits": bits, "group_size": gs, "abits": abits,
           "tweak": None, "label": label}
    if len(parts) > 2:
        if parts[2] != "nt":
            raise SystemExit(f"row {name!r}: the third part must be 'nt'")
        row["tweak"] = {}
        for kv in parts[3:]:
            k, _, v = kv.partition("=")
            ints = ("passes", "skip_first", "kl_passes")
            row["tweak"][k] = (v if k in ("loss", "order", "target", "kl_norms") else int(v) if k in ints
                               else float(v))
    return row


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def settings(args) -> dict:
    s = {k: getattr(args, k) for k in ("lambada_limit", "ppl_windows", "mc_limit", "calib", "calib_seed", "nsamples",
                                       "seqlen", "tweak_lr", "tweak_scale", "sym", "act_order", "mc_tasks")}
    if args.tweak_calib:  # only when given, so stores written before the option still match
        s["tweak_calib"] = args.tweak_calib
    return s


def linear_sha(model) -> str:
    """SHA-256 of every Linear weight, in module order: a post-step row (`-nt-order=after`, which moves only the
    norms) and the plain row it is paired with agree here exactly when both ran the same GPTQ."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            h.update(name.encode())
            h.update(mod.weight.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def run_row(args) -> dict:
    """Quantize (and tweak) one row in this process and evaluate it."""
    import torch

    import normtweak as nt
    from normtweak import eval as ev
    from normtweak.calibration import cached_calibration
    from normtweak.corpora import english_text
    from normtweak.models import load_model

    nt.set_num_threads(torch.get_num_threads())
    spec = parse_row(args.run_row)
    held_text = None if args.lambada_only else english_text("persuasion")  # a missing corpus fails now, not in an hour
    model, tok = load_model("smollm2-135m")
    secs, extra = 0.0, {}
    if spec["method"] != "float":
        calib = cached_calibration(model, tok, args.calib, args.nsamples, args.seqlen, seed=args.calib_seed)
        cfg = nt.GPTQConfig(bits=spec["bits"], group_size=spec["group_size"], method=spec["method"], sym=args.sym,
                            act_order=args.act_order, abits=spec["abits"], weight_method=spec["weight_method"],
                            mse=spec["mse"])
        tweak = None
        if spec["tweak"] is not None:
            # kl_judge 0: the KL stage's before/after on every calibration sample, as the stored rows measured it
            tweak = nt.TweakConfig(**{"lr": args.tweak_lr, "scale": args.tweak_scale, "kl_judge": 0, **spec["tweak"]})
        post_step = tweak is not None and tweak.order == "after"
        if args.tweak_calib and not post_step:
            raise SystemExit(f"--tweak-calib {args.tweak_calib} needs a post-step row (-nt-order=after); "
                             f"{args.run_row} calibrates GPTQ and the tweak on one set")
        # the cache holds Linear weights only: SmoothQuant's folded norm scales and activation quantizers are not in it
        cache = Path(args.weights_cache) if args.weights_cache and spec["method"] != "smoothquant" else None
        t0 = time.perf_counter()
        if post_step:  # the same steps as order="after" in the pipeline, split so the GPTQ weights can be cached
            tcalib = calib if not args.tweak_calib else cached_calibration(
                model, tok, args.tweak_calib, args.nsamples, args.seqlen, seed=args.calib_seed)
            float_model = copy.deepcopy(model)
            gptq_s = quantize_cached(model, calib, cfg, cache)
            t0 = time.perf_counter()
            rep = nt.pipeline.quantize(model, tcalib, cfg, tweak, float_model=float_model)
            del float_model
            extra = {"gptq_s": gptq_s, "tweak_s": time.perf_counter() - t0}
            if rep.kl_tweak:  # the KL stage's own numbers (next-token KL before and after, on its judge samples)
                extra["kl_tweak"] = rep.kl_tweak
            secs = gptq_s + extra["tweak_s"]
        elif tweak is None:  # the plain row: shares its weights with the post-step rows through the cache
            secs = quantize_cached(model, calib, cfg, cache)
        else:
            nt.pipeline.quantize(model, calib, cfg, tweak)
            secs = time.perf_counter() - t0
    row_settings = settings(args)
    res = {"row": args.run_row, "settings": row_settings, "calib_sampler": sampler(row_settings), "quantize_s": secs,
           "linear_sha": linear_sha(model), **extra}
    if args.extend:
        earlier = earlier_row(args.extend, args.run_row)
        check_extendable(earlier, res)
        ppl = ev.perplexity(model, tok, held_text, seqlen=512, max_chunks=args.ppl_windows)["ppl"]
        check_reproduced(earlier, res, ppl)
        return extend_row(earlier, res, args, lambda task: ev.multiple_choice(model, tok, task, limit=args.mc_limit))
    lam = ev.lambada(model, tok, limit=args.lambada_limit, per_passage=True)
    res["lambada_acc"], res["lambada_ppl"], res["lambada_n"] = lam["acc"], lam["ppl"], lam["n"]
    res["lambada_correct"] = bits_to_hex(lam["correct"])
    if args.lambada_only:
        return res
    res["ppl"] = ev.perplexity(model, tok, held_text, seqlen=512, max_chunks=args.ppl_windows)["ppl"]
    for task in [t for t in args.mc_tasks.split(",") if t]:
        r = ev.multiple_choice(model, tok, task, limit=args.mc_limit)
        res[task], res[task + "_norm"], res[task + "_n"] = r["acc"], r["acc_norm"], r["n"]
    res["peak_rss_gib"] = peak_rss_gib()
    res["threads"] = torch.get_num_threads()
    return res


# Settings that change no float row's numbers: a float row has no calibration and no quantizer.
FLOAT_FREE_SETTINGS = ("calib", "calib_seed", "nsamples", "seqlen", "tweak_lr", "tweak_scale", "sym", "act_order",
                       "tweak_calib")
REPRODUCE_REL = 1e-9  # a row run again on one thread with the same code repeats its float sums exactly


def earlier_row(path: str, name: str) -> dict:
    """Row `name` from a --run-row file or a store (`{"settings", "rows": {...}}`), with the store's settings and
    sampler, as --extend starts from it."""
    d = json.loads(Path(path).read_text())
    if "rows" in d:
        if name not in d["rows"]:
            raise SystemExit(f"--extend {path}: the store has no row {name!r} (it has {', '.join(d['rows'])})")
        d = {**d["rows"][name], "row": name, "settings": d["settings"],
             **({"calib_sampler": d["calib_sampler"]} if "calib_sampler" in d else {})}
    if d.get("row") != name:
        raise SystemExit(f"--extend {path} holds row {d.get('row')!r}, not {name!r}")
    if "settings" not in d:
        raise SystemExit(f"--extend {path}: row {name!r} was stored without its settings; measure it again")
    return d


def settings_diff(row: str, a: dict, b: dict, ignore: tuple[str, ...] = ()) -> dict:
    """{setting: (a's, b's)} where two measurements of `row` differ in a way that changes its numbers (a float row
    has no calibration and no quantizer)."""
    skip = set(ignore) | (set(FLOAT_FREE_SETTINGS) if row == "float" else set())
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if k not in skip and a.get(k) != b.get(k)}


def check_extendable(earlier: dict, now: dict) -> None:
    """--extend adds tasks to an earlier measurement of the same row: it must have used these settings (all but the
    multiple-choice tasks) and this calibration sampler, and ran GPTQ to the same weights."""
    diff = settings_diff(now["row"], earlier["settings"], now["settings"], ignore=("mc_tasks",))
    if diff:
        raise SystemExit(f"--extend: row {now['row']} was measured with other settings (earlier, now: {diff}); "
                         "pass the earlier settings")
    if now["row"] != "float":
        check_same_sampler(earlier, now, "--extend cannot add to it; measure it again")
    if earlier.get("linear_sha", now["linear_sha"]) != now["linear_sha"]:
        raise SystemExit(f"--extend: row {now['row']}'s Linear weights differ from the earlier run's (sha "
                         f"{now['linear_sha']} vs {earlier['linear_sha']}): other code or threads; measure it again")


def check_reproduced(earlier: dict, now: dict, ppl: float) -> None:
    """The model is the earlier one, norms included: its text perplexity and (with a KL stage) the stage's final
    KL repeat to REPRODUCE_REL."""
    pairs = [("text ppl", earlier.get("ppl"), ppl)]
    if "kl_tweak" in earlier or "kl_tweak" in now:
        pairs.append(("KL stage loss_after", earlier.get("kl_tweak", {}).get("loss_after"),
                      now.get("kl_tweak", {}).get("loss_after")))
    for what, a, b in pairs:
        if a is None or b is None or abs(b / a - 1) > REPRODUCE_REL:
            raise SystemExit(f"--extend: row {now['row']} did not reproduce its {what} ({b} now, {a} earlier); "
                             "measure it again instead")


def extend_row(earlier: dict, now: dict, args, mc: Callable[[str], dict]) -> dict:
    """The earlier row with the multiple-choice tasks of --mc-tasks it lacks, measured now by `mc(task)`."""
    tasks = [t for t in args.mc_tasks.split(",") if t]
    added = [t for t in tasks if t not in earlier]
    res = {**earlier, "settings": {**earlier["settings"], "mc_tasks": args.mc_tasks}}
    for task in added:
        r = mc(task)
        res[task], res[task + "_norm"], res[task + "_n"] = r["acc"], r["acc_norm"], r["n"]
    res["extended"] = {"tasks": added, "date": str(datetime.date.today()), "linear_sha": now["linear_sha"],
                       "peak_rss_gib": peak_rss_gib()}
    return res


def import_rows(store: dict, files: list[str]) -> None:
    """Put --run-row files into `store`; each must have been measured with the store's settings and calibration
    sampler (a float row: with its evaluation settings)."""
    for f in files:
        r = json.loads(Path(f).read_text())
        if "settings" not in r or "row" not in r:
            raise SystemExit(f"--import-rows {f}: not a --run-row file (no row name or settings)")
        diff = settings_diff(r["row"], r["settings"], store["settings"])
        if diff:
            raise SystemExit(f"--import-rows {f}: row {r['row']} was measured with other settings than the store's "
                             f"(row, store: {diff}); pass the row's settings")
        if r["row"] != "float":
            check_same_sampler(store, r, f"--import-rows cannot put {f} into this store")
        store["rows"][r["row"]] = {k: v for k, v in r.items() if k not in ("row", "settings", "calib_sampler")}


def quantize_cached(model, calib, cfg, folder: Path | None) -> float:
    """Quantize `model` without tweaking, or load the Linear weights an identical earlier run left in `folder`
    (--weights-cache): post-step rows with different tweak settings then share one GPTQ run. The key covers the
    model, the calibration ids, the quantizer settings, the thread count (GPTQ's float sums depend on it) and the
    normtweak package's files (Python and the compiled core).
    Returns the seconds the quantization took when it ran (stored beside the weights). folder None: no cache."""
    import dataclasses
    import hashlib

    import torch

    import normtweak as nt
    from normtweak.models import blocks, model_fingerprint, save_atomic

    # The quantized Linears are the blocks' (lm_head stays float and may share the embedding's storage).
    linears = {f"{i}.{n}": m for i, blk in enumerate(blocks(model)) for n, m in blk.named_modules()
               if isinstance(m, torch.nn.Linear)}
    path = None
    if folder is not None:
        h = hashlib.sha256(b"block-linears")
        h.update(model_fingerprint(model).encode())
        h.update(calib.contiguous().numpy().tobytes())
        h.update(json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str).encode())
        h.update(str(torch.get_num_threads()).encode())
        pkg = Path(nt.__file__).parent  # the quantizer's code: a changed pipeline or C++ core quantizes afresh
        for f in sorted([*pkg.glob("*.py"), *pkg.glob("_core*.so"), *pkg.glob("_core*.pyd")]):
            h.update(f.name.encode())
            h.update(f.read_bytes())
        path = folder / f"weights-{h.hexdigest()[:16]}.pt"
        if path.exists():
            saved = torch.load(path)
            with torch.no_grad():
                for n, m in linears.items():
                    m.weight.copy_(saved["weights"][n])
            print(f"quantized weights from {path} (sha {saved['linear_sha']})", file=sys.stderr)
            return saved["seconds"]
    t0 = time.perf_counter()
    nt.pipeline.quantize(model, calib, cfg, None)
    secs = time.perf_counter() - t0
    if path is not None:
        folder.mkdir(parents=True, exist_ok=True)
        save_atomic({"weights": {n: m.weight.detach().clone() for n, m in linears.items()}, "seconds": secs,
                     "linear_sha": linear_sha(model)}, path)
    return secs


@contextlib.contextmanager
def store_lock(store_path: Path):
    """Exclusive lock beside the store, so two invocations filling one store (one row each at a time, e.g.
    two one-thread streams on the 2 cores) never drop each other's rows."""
    with open(store_path.with_name(store_path.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


LEGACY_SAMPLER = "shared"  # stores without "calib_sampler": generated before each sample had its own generator


def sampler(settings_: dict) -> str | None:
    """How generated calibration is drawn now (normtweak.calibration.SAMPLER); None for text calibration."""
    from normtweak.calibration import SAMPLER

    return SAMPLER if settings_.get("calib") == "generate" else None


def stored_sampler(d: dict) -> str | None:
    """The calibration sampler a store or a --run-row file was measured with: None for text calibration; those
    written before the sampler was recorded (or before their settings were) drew from the old shared stream
    (LEGACY_SAMPLER)."""
    if d.get("settings", {}).get("calib", "generate") != "generate":
        return None
    return d.get("calib_sampler", LEGACY_SAMPLER)


def same_draw(store: dict, settings_: dict) -> bool:
    """Rows in `store` were measured with these settings and the calibration this normtweak draws for them."""
    return store.get("settings") == settings_ and stored_sampler(store) == sampler(settings_)


def stored_rows(store_path: Path, settings_: dict) -> dict:
    """The rows on disk now, if they were measured with these settings (writes are atomic renames: no lock)."""
    current = json.loads(store_path.read_text()) if store_path.exists() else {}
    return current["rows"] if same_draw(current, settings_) else {}


def update_store(store: dict, store_path: Path, name: str, fields: dict) -> None:
    """Merge `fields` into row `name` and write the store, keeping rows another invocation stored meanwhile."""
    with store_lock(store_path):
        store["rows"] = {**stored_rows(store_path, store["settings"]), **store["rows"]}
        store["rows"][name] = {**store["rows"].get(name, {}), **fields}
        store["written"] = str(datetime.date.today())  # the page shows when rows were measured, not rendered
        write_atomic(store_path, json.dumps(store, indent=1))


def bits_to_hex(bits: list[bool]) -> str:
    """Per-passage results, packed: passage i is bit i % 4 of hex digit i // 4."""
    return "".join(f"{sum(1 << j for j, b in enumerate(bits[i:i + 4]) if b):x}" for i in range(0, len(bits), 4))


def hex_to_bits(text: str, n: int) -> list[bool]:
    return [bool(int(text[i // 4], 16) >> (i % 4) & 1) for i in range(n)]


def paired_text(base: dict, row: dict) -> str:
    """Two rows' per-passage LAMBADA results compared passage by passage: "+gained/-lost (z)"."""
    from normtweak.eval import paired_counts

    n = row["lambada_n"]
    p = paired_counts(hex_to_bits(base["lambada_correct"], n), hex_to_bits(row["lambada_correct"], n))
    return f"+{p['gained']}/-{p['lost']} (z {p['z']:+.1f})"


def paired_cell(rows: dict, name: str) -> str:
    """NT rows against the same weights without NT, passage by passage: "+gained/-lost (z)"."""
    base = name.split("-nt")[0]
    r, b = rows[name], rows.get(base)
    if base == name or b is None or "lambada_correct" not in r or "lambada_correct" not in b:
        return ""
    return paired_text(b, r)


def check_same_sampler(base: dict, row: dict, what: str = "not pairable. Pair rows measured by one normtweak "
                       "version (measure the older row again with --run-row)") -> None:
    """Rows compared or merged (paired passage by passage, extended, imported into a store) must share a
    calibration draw: refuse rows from different samplers; `what` ends the message."""
    if stored_sampler(base) != stored_sampler(row):
        raise SystemExit(f"row {row.get('row')} was calibrated with sampler {stored_sampler(row)!r} and "
                         f"{base.get('row', 'the store')} with {stored_sampler(base)!r}: not the same draw, so {what}")


def row_label(r: dict) -> str:
    """A --run-row file's row name, with the tweak's own calibration when it had one (--tweak-calib)."""
    tc = r.get("settings", {}).get("tweak_calib")
    return f"`{r['row']}`" + (f" (tweak on {tc})" if tc else "")


def pair_table(rows: list[dict]) -> str:
    """Rows written by --run-row, as a markdown table; each row after the first is paired against the first."""
    base = rows[0]
    n = base["lambada_n"]
    lines = ["| row | LAMBADA acc (passages) | vs first, paired | last-word ppl | text ppl | quantize s |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["lambada_n"] != n:
            raise SystemExit(f"row {r['row']} has {r['lambada_n']} passages, {base['row']} {n}: not pairable")
        check_same_sampler(base, r)
        pair = "" if r is base else paired_text(base, r)
        right = sum(hex_to_bits(r["lambada_correct"], n))
        ppl = f"{r['ppl']:.2f}" if "ppl" in r else ""
        lines.append(f"| {row_label(r)} | {r['lambada_acc']:.4f} ({right}) | {pair} | {r['lambada_ppl']:.2f} | {ppl} | "
                     f"{r['quantize_s']:.0f} |")
    return "\n".join(lines)


def draws_table(files: list[str]) -> str:
    """BASE ROW pairs of --run-row files, one pair per calibration draw, as a markdown table: each draw paired
    passage by passage, then the difference averaged over the draws (normtweak.eval.paired_over_draws)."""
    from normtweak.eval import paired_over_draws

    if len(files) % 2:
        raise SystemExit(f"--pair-draws takes BASE ROW pairs; got {len(files)} files")
    rows = [json.loads(Path(p).read_text()) for p in files]
    pairs = list(zip(rows[::2], rows[1::2]))
    n = rows[0]["lambada_n"]
    for r in rows:
        if r["lambada_n"] != n:
            raise SystemExit(f"row {r['row']} has {r['lambada_n']} passages, {rows[0]['row']} {n}: not pairable")
    lines = [f"| calibration | {row_label(pairs[0][0])} passages | {row_label(pairs[0][1])} passages | paired |",
             "|---|---:|---:|---:|"]
    bits = []
    for (b, r), path in zip(pairs, files[1::2]):
        check_same_sampler(b, r)
        s = r.get("settings", {})
        label = f"{s['nsamples']} x {s['seqlen']}, seed {s['calib_seed']}" if s else Path(path).stem
        if stored_sampler(r) == LEGACY_SAMPLER:
            label += " (old shared-stream sampler)"
        bits.append((hex_to_bits(b["lambada_correct"], n), hex_to_bits(r["lambada_correct"], n)))
        lines.append(f"| {label} | {sum(bits[-1][0])} | {sum(bits[-1][1])} | {paired_text(b, r)} |")
    m = paired_over_draws(bits)
    lines.append(f"| mean over {m['draws']} draws | | | {m['diff']:+.1f} +- {m['se']:.1f} passages (z {m['z']:+.1f}) |")
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: two invocations may share --out
    tmp.write_text(text)
    tmp.replace(path)


def render(store: dict, store_path: Path, wanted: list[str], heading: str = "# Accuracy on SmolLM2-135M-Instruct") -> str:
    s = store["settings"]
    tasks = [t for t in s["mc_tasks"].split(",") if t]
    rows = store["rows"]
    n = next((r["lambada_n"] for r in rows.values()), 0)
    limit = f", first {s['mc_limit']} questions" if s["mc_limit"] else ""
    paired = any("lambada_correct" in r for r in rows.values())
    head = ["model", "weights", "LAMBADA acc"] + (["vs no NT, paired"] if paired else []) + ["LAMBADA ppl", "text ppl"]
    head += tasks + ["quantize s", "peak RSS GiB"]
    lines = [
        heading,
        "",
        f"Written {store.get('written', datetime.date.today())} by `benchmarks/bench_accuracy.py` on 2 CPU cores "
        f"(rows stored in `docs/{store_path.name}`). Calibration: {calib_words(store)}, {s['nsamples']} x {s['seqlen']} "
        "tokens. "
        f"GPTQ and RTN: {'symmetric' if s['sym'] else 'asymmetric'} grid"
        f"{', GPTQ with act-order' if s['act_order'] else ''}. Norm Tweaking (NT): lr0 = {s['tweak_lr']}, "
        f"scale {s['tweak_scale']}, one pass, batch 1, dist loss unless the row says otherwise. "
        f"LAMBADA: {n} passages (greedy last-word accuracy; perplexity of the last word). Text ppl: "
        f"{s['ppl_windows']} x 512 tokens of Persuasion. Multiple choice (accuracy, lm-eval-harness prompts): "
        f"{', '.join(tasks) or 'none'}{limit}. "
        "Peak RSS is the row's own process. What the numbers show: [findings.md](findings.md).",
        "",
        "| " + " | ".join(head) + " |",
        "|---|---|" + "---:|" * (len(head) - 2),
    ]

    def label(name: str) -> tuple[str, str]:
        spec = parse_row(name)
        if spec["method"] == "float":
            return "float", "-"
        w = f"W{spec['bits']} " + ("per-channel" if spec["group_size"] < 0 else f"g{spec['group_size']}")
        if spec["abits"] < 16:
            w = f"W{spec['bits']}A{spec['abits']}"
        model = spec["label"]
        if spec["tweak"] is not None:
            model += " + NT" + "".join(f", {TWEAK_WORDS.get((k, v), f'{k} {v}')}" for k, v in spec["tweak"].items())
        return model, w

    known = list(dict.fromkeys(MAIN_ROWS + ABLATION_ROWS + RECOMMENDED_ROWS + SMOOTHQUANT_ROWS))
    for name in known + sorted(set(rows) - set(known)):
        r = rows.get(name)
        if r is None:
            continue
        cells = list(label(name)) + [f"{r['lambada_acc']:.4f}"] + ([paired_cell(rows, name)] if paired else [])
        cells += [f"{r['lambada_ppl']:.2f}", f"{r['ppl']:.2f}"]
        cells += [f"{r[t]:.4f}" for t in tasks] + [f"{r['quantize_s']:.0f}", f"{r['peak_rss_gib']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if paired:
        lines += ["", "Paired: passages the NT row gets right and the same weights without NT get wrong (+), and the "
                  "reverse (-); z = (+ - -) / sqrt(+ + -) (McNemar; |z| > 1.96 is unlikely to be noise). Only rows "
                  "measured since per-passage results were stored have it."]
    if any(parse_row(r).get("abits", 16) < 16 for r in rows):
        lines += ["", "SmoothQuant rows: weights per output channel, symmetric, round-to-nearest (or GPTQ where the "
                  "row says so) on the smoothed weights; activations per-token dynamic symmetric (simulated); "
                  "alpha 0.5 on each block's two norm -> Linear pairs and, where abits <= wbits (W8A8, W4A4), "
                  "its v_proj -> o_proj and up_proj -> down_proj pairs (see findings.md); NT inside the walk, "
                  "seeing the activation quantization."]
    threads = sorted({r.get("threads") for r in rows.values() if r.get("threads")})
    if threads:
        lines += ["", f"Rows measured since the `threads` field was added ran on {'/'.join(map(str, threads))} "
                  "thread(s) each, two rows at a time on the 2 cores; quantize seconds compare only roughly."]
    extended = [n for n, r in rows.items() if r.get("extended", {}).get("tasks")]
    if extended:
        tasks = sorted({t for n in extended for t in rows[n]["extended"]["tasks"]})
        lines += ["", f"{', '.join(tasks)} of {', '.join(f'`{n}`' for n in extended)} were measured later, on the "
                  "same model built again (`--run-row ROW --extend`: its Linear weights, text perplexity and any KL "
                  "stage result reproduced); the other columns are the first run's."]
    lines += ["", "Command: `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/bench_accuracy.py "
              f"--rows {','.join(rows)} {' '.join(setting_flags(s, shell=True))} --store docs/{store_path.name}`"]
    missing = [r for r in wanted if r not in rows]
    if missing:
        lines += ["", f"Not yet measured with these settings: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def child_flags(args) -> list[str]:
    return setting_flags(settings(args)) + (["--weights-cache", args.weights_cache] if args.weights_cache else [])


def calib_words(store: dict) -> str:
    s = store["settings"]
    if s["calib"] != "generate":
        return f"{s['calib']} (seed {s['calib_seed']})"
    if stored_sampler(store) == LEGACY_SAMPLER:
        return (f"generated by the model (seed {s['calib_seed']}; drawn before each sample had a generator of its "
                "own, from one random stream across batches of 8 samples: normtweak today draws other samples for "
                "the same seed)")
    return f"generated by the model (seed {s['calib_seed']})"


def setting_flags(s: dict, shell: bool = False) -> list[str]:
    """Command-line flags for these settings: argv items, or shell-quoted words to print (shell=True)."""
    flags = []
    for k, v in s.items():
        opt = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            flags.append(opt if v else "--no-" + opt[2:])
        elif v is not None:
            flags += [opt, shlex.quote(str(v)) if shell else str(v)]
    return flags


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="main,ablation",
                    help="main, ablation, recommended, smoothquant, or row names (e.g. gptq-w3g128-nt, sq-w8a8-nt)")
    ap.add_argument("--lambada-limit", type=int, default=None)
    ap.add_argument("--ppl-windows", type=int, default=40)
    ap.add_argument("--mc-tasks", default="piqa,arc_easy")
    ap.add_argument("--mc-limit", type=int, default=None)
    ap.add_argument("--calib", default="generate", help="generate, or text:NAME (an English text, e.g. text:emma)")
    ap.add_argument("--calib-seed", type=int, default=0,
                    help="seed of the calibration draw (generation or text windows); rows with other seeds "
                         "measure how much a result owes to one calibration set")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--tweak-lr", type=float, default=1e-5)
    ap.add_argument("--tweak-scale", type=float, default=5.0)
    ap.add_argument("--tweak-calib", default=None, metavar="SOURCE",
                    help="post-step rows (-nt-order=after) only: tweak on this calibration (as --calib; same count, "
                         "length and seed) instead of the one GPTQ used")
    ap.add_argument("--sym", action=argparse.BooleanOptionalAction, default=False,
                    help="symmetric grid (the main table: asymmetric, as GPTQ's paper; the SmoothQuant rows: --sym)")
    ap.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--store", default=str(ROOT / "docs" / "results.json"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "results.md"))
    ap.add_argument("--also", action="append", default=None,
                    help="further stores whose tables are appended to --out (default with the default store: "
                         "docs/results_smoothquant.json)")
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite --out from the stored rows (listing the wanted rows not yet measured); run nothing")
    ap.add_argument("--backfill", action="store_true",
                    help="for the wanted rows stored without per-passage LAMBADA results: quantize again, run "
                         "LAMBADA only, and store the per-passage results if accuracy and perplexity reproduce the "
                         "stored ones (rows run on one thread are deterministic)")
    ap.add_argument("--lambada-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run-row", metavar="ROW",
                    help="run this one row in this process and write its results (with per-passage LAMBADA "
                         "results) to --row-out instead of the store")
    ap.add_argument("--row-out", metavar="PATH", help="where --run-row writes its JSON")
    ap.add_argument("--weights-cache", metavar="DIR",
                    help="post-step rows (-nt-order=after) and rows without NT, SmoothQuant's excepted: keep the "
                         "quantized weights in DIR and reuse them when "
                         "another row quantizes the same model on the same calibration with the same settings "
                         "(the key covers the normtweak package's code, so any change to it quantizes afresh)")
    ap.add_argument("--extend", metavar="JSON",
                    help="with --run-row: the row's earlier measurement (a --run-row file or a store); quantize and "
                         "tweak again, check that the weights, the KL stage's result and the text perplexity "
                         "reproduce it, and add only the --mc-tasks it lacks (its LAMBADA results are kept)")
    ap.add_argument("--import-rows", nargs="+", metavar="ROW_JSON",
                    help="put these --run-row files into --store (they must have its settings), then write --out")
    ap.add_argument("--pair", nargs="+", metavar="ROW_JSON",
                    help="print the rows that --run-row wrote, each paired passage by passage with the first")
    ap.add_argument("--pair-draws", nargs="+", metavar="ROW_JSON",
                    help="BASE ROW pairs of --run-row files, one pair per calibration draw (--calib-seed): each pair "
                         "compared passage by passage, then the difference averaged over the draws")
    args = ap.parse_args()
    if args.pair_draws:
        print(draws_table(args.pair_draws))
        return
    if args.pair:
        print(pair_table([json.loads(Path(p).read_text()) for p in args.pair]))
        return
    if args.run_row and not args.row_out:
        ap.error("--run-row needs --row-out")
    if args.extend and not args.run_row:
        ap.error("--extend goes with --run-row")
    if args.also is None:
        default = Path(args.store).resolve() == (ROOT / "docs" / "results.json").resolve()
        args.also = [str(ROOT / "docs" / n) for n in ALSO_STORES] if default else []
    if args.run_row:
        write_atomic(Path(args.row_out), json.dumps(run_row(args)))
        return

    wanted: list[str] = []
    for item in args.rows.split(","):
        groups = {"main": MAIN_ROWS, "ablation": ABLATION_ROWS, "smoothquant": SMOOTHQUANT_ROWS,
                  "recommended": RECOMMENDED_ROWS}
        wanted += groups.get(item, [item])
    for name in wanted:
        parse_row(name)
    store_path = Path(args.store)
    store = json.loads(store_path.read_text()) if store_path.exists() else {}
    if store.get("settings") != settings(args) and args.render_only:
        raise SystemExit(f"--render-only: {store_path} holds rows measured with other settings "
                         f"({store.get('settings')}); pass those settings")
    if not args.render_only and not same_draw(store, settings(args)):
        if store.get("rows"):
            print(f"{store_path}: stored rows used other settings or another calibration sampler; starting a new "
                  "table", flush=True)
        store = {"settings": settings(args), "rows": {}}
        if sampler(store["settings"]):
            store["calib_sampler"] = sampler(store["settings"])
    if args.import_rows:
        import_rows(store, args.import_rows)
        store["written"] = str(datetime.date.today())
        write_atomic(store_path, json.dumps(store, indent=1))
        wanted = [r for r in wanted if r in store["rows"]]
    if args.backfill:
        backfill(args, store, store_path, wanted)
    for name in [] if args.render_only or args.backfill or args.import_rows else wanted:
        store["rows"].update(stored_rows(store_path, store["settings"]))
        if name in store["rows"]:
            print(f"{name}: stored, skipped", flush=True)
            continue
        print(f"== {name}", flush=True)
        row_out = store_path.with_name(f".row-{name}-{os.getpid()}.json")
        cmd = [sys.executable, __file__, "--run-row", name, "--row-out", str(row_out)] + child_flags(args)
        subprocess.run(cmd, check=True, env=os.environ)
        update_store(store, store_path, name, json.loads(row_out.read_text()))
        row_out.unlink()
        write_atomic(Path(args.out), page(store, store_path, wanted, args.also))
        print(json.dumps(store["rows"][name]), flush=True)
    text = page(store, store_path, wanted, args.also)
    write_atomic(Path(args.out), text)
    print(text)


def plot(store: dict, path: Path) -> bool:
    """Grouped bars of the main table: LAMBADA accuracy and the last word's perplexity per weight setting,
    one bar per method, float as a line. False (nothing written) when no quantized main row is stored."""
    rows = store["rows"]
    methods = [("rtn", "RTN"), ("rtn-nt", "RTN + NT"), ("gptq", "GPTQ"), ("gptq-nt", "GPTQ + NT"),
               ("gptq-nt-order=after", "GPTQ + NT post-step"),
               ("gptq-nt-order=after-lr=0.001", "GPTQ + NT post-step, lr0 1e-3")]
    configs = list(CONFIGS)

    def name(m: str, c: str) -> str:
        head, _, tail = m.partition("-")
        return f"{head}-{c}" + (f"-{tail}" if tail else "")

    methods = [(m, lbl) for m, lbl in methods if any(name(m, c) in rows for c in configs)]
    if not methods:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / len(methods)
    for ax, key, title, log in ((axes[0], "lambada_acc", "LAMBADA accuracy (5153 passages)", False),
                                (axes[1], "lambada_ppl", "LAMBADA last-word perplexity", True)):
        for k, (m, lbl) in enumerate(methods):
            xs = [i + (k - (len(methods) - 1) / 2) * width for i, c in enumerate(configs) if name(m, c) in rows]
            ys = [rows[name(m, c)][key] for c in configs if name(m, c) in rows]
            ax.bar(xs, ys, width, label=lbl)
        if "float" in rows:
            ax.axhline(rows["float"][key], color="k", ls="--", lw=1, label="float")
        ax.set_xticks(range(len(configs)), [{"w4": "W4 per-channel", "w3g128": "W3 g128", "w2g64": "W2 g64"}[c]
                                            for c in configs])
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct: quantization with and without Norm Tweaking (missing bars: not measured)",
                 fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return True


def backfill(args, store: dict, store_path: Path, wanted: list[str]) -> None:
    """Per-passage LAMBADA results for stored rows that lack them. A row that does not reproduce is reported and
    skipped (the later rows are still tried); the invocation then exits non-zero naming every such row."""
    failed = []
    for name in wanted:
        old = store["rows"].get(name)
        if old is None or "lambada_correct" in old:
            print(f"{name}: {'not stored' if old is None else 'has per-passage results'}, skipped", flush=True)
            continue
        print(f"== {name} (LAMBADA again, for per-passage results)", flush=True)
        row_out = store_path.with_name(f".row-{name}-{os.getpid()}.json")
        cmd = [sys.executable, __file__, "--run-row", name, "--row-out", str(row_out), "--lambada-only"]
        subprocess.run(cmd + child_flags(args), check=True, env=os.environ)
        new = json.loads(row_out.read_text())
        if new["lambada_acc"] != old["lambada_acc"] or abs(new["lambada_ppl"] / old["lambada_ppl"] - 1) > 1e-6:
            print(f"{name}: LAMBADA did not reproduce (acc {new['lambada_acc']} vs stored {old['lambada_acc']}, "
                  f"ppl {new['lambada_ppl']} vs {old['lambada_ppl']}); the stored row was measured with other code "
                  f"or threads: measure it again instead. This run's per-passage results are kept in {row_out}",
                  flush=True)
            failed.append(name)
            continue
        row_out.unlink()
        update_store(store, store_path, name, {"lambada_correct": new["lambada_correct"]})
        print(f"{name}: per-passage results stored (accuracy {new['lambada_acc']:.4f} reproduced)", flush=True)
    if failed:
        raise SystemExit(f"--backfill: {', '.join(failed)} did not reproduce (see above); nothing stored for them")


def anchor(title: str) -> str:
    """The link target GitHub gives a markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return "".join(c for c in title.lower() if c.isalnum() or c in " -").replace(" ", "-")


def page(store: dict, store_path: Path, wanted: list[str], also: list[str]) -> str:
    """This store's table, then one section per further store (e.g. the SmoothQuant rows under results.md)."""
    text = render(store, store_path, wanted)
    sections = [ALSO_STORES.get(p.name, p.stem) for p in map(Path, also)
                if p.exists() and p.resolve() != store_path.resolve()]
    if sections:  # after the first paragraph, so a reader of the main table knows what follows
        head, intro, rest = text.split("\n\n", 2)
        links = ", ".join(f"[{t}](#{anchor(t)})" for t in sections)
        text = f"{head}\n\n{intro}\n\nFurther sections below: {links}.\n\n{rest}"
    png = store_path.with_suffix(".png")
    if any(parse_row(r).get("abits", 16) == 16 for r in store["rows"] if r != "float") and plot(store, png):
        text += f"\n![LAMBADA accuracy and last-word perplexity per row]({png.name})\n"
    for path in map(Path, also):
        if path.exists() and path.resolve() != store_path.resolve():
            other = json.loads(path.read_text())
            title = ALSO_STORES.get(path.name, path.stem)
            text += "\n" + render(other, path, [], heading=f"## {title}")
    return text


if __name__ == "__main__":
    main()
