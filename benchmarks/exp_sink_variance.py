"""How much of each channel's variance on SmolLM2-135M comes from the first token of a sequence (the attention
sink, which carries "massive activations"). The float model on 8 x 256 tokens of each calibration source; per
block: the channel of largest variance over all tokens, that variance, the same channel's variance over positions
1.. only, the largest |value| at position 0 and the median channel variance. Eq. 2 measures every channel's
variance over all tokens, so a channel whose variance is mostly one token's makes the loss about that token.
docs/findings.md, "The first token carries the variance":

  .venv/bin/python benchmarks/exp_sink_variance.py
"""
import torch

from normtweak.calibration import cached_calibration
from normtweak.models import load_model

BLOCKS = (0, 2, 5, 10, 15, 20, 25, 28, 29)
torch.set_num_threads(1)
model, tok = load_model("smollm2-135m")
print("| calibration | block | channel | var, all tokens | var, positions 1.. | ratio | max abs at position 0 | "
      "median var |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for source in ("generate", "text:emma"):
    ids = cached_calibration(model, tok, source, 128, 256, seed=0)[:8]
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    for b in BLOCKS:
        if b == len(hs) - 2:
            break  # the last hidden state has the final norm applied
        h = hs[b + 1].double()
        v_all = h.reshape(-1, h.shape[-1]).var(0, unbiased=False)
        v_rest = h[:, 1:].reshape(-1, h.shape[-1]).var(0, unbiased=False)
        c = int(v_all.argmax())
        print(f"| {source} | {b} | {c} | {v_all[c]:.3g} | {v_rest[c]:.3g} | {v_all[c] / v_rest[c]:.0f} | "
              f"{h[:, 0].abs().max():.3g} | {v_all.median():.3g} |")
