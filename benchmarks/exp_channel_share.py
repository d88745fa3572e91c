"""Which channels carry the Norm Tweaking loss (eq. 2) on SmolLM2-135M: the first 12 blocks quantized by GPTQ
W3 g128 with the clipping search (calibration 32 x 256 tokens of Emma), each block's output compared with the float
model's on 8 x 256 held-out tokens of Persuasion. Per block: the loss, the share of it carried by the 5 largest
channel terms and which channels they are, the median and largest channel variance of the float output, and
mean |var_f - var_q| / var_f (the variance gap in each channel's own units). docs/findings.md, "Five channels
carry the loss":

  .venv/bin/python benchmarks/exp_channel_share.py
"""
import copy

import torch

import normtweak as nt
from normtweak.calibration import text_calibration
from normtweak.corpora import english_text
from normtweak.models import keep_first_blocks, load_model

BLOCKS = 12
torch.set_num_threads(1)
nt.set_num_threads(1)
model, tok = load_model("smollm2-135m")
keep_first_blocks(model, BLOCKS)
calib = text_calibration(tok, english_text("emma"), n=32, seqlen=256, seed=0)
quant = copy.deepcopy(model)
nt.pipeline.quantize(quant, calib, nt.GPTQConfig(bits=3, group_size=128, act_order=True, mse=True), None,
                     progress=False)
held = text_calibration(tok, english_text("persuasion"), n=8, seqlen=256, seed=1)
with torch.no_grad():
    fs = model(input_ids=held, output_hidden_states=True).hidden_states[1:BLOCKS]
    qs = quant(input_ids=held, output_hidden_states=True).hidden_states[1:BLOCKS]
print("| block | loss | top-5 share | top-5 channels | median var_f | max var_f | mean abs(dvar)/var_f |")
print("|---:|---:|---:|---|---:|---:|---:|")
for i, (f, q) in enumerate(zip(fs, qs)):
    f, q = f.double(), q.double()  # [samples, tokens, C]; statistics per sample, as the tweak sees them
    var_f = f.var(1, unbiased=False)
    dmu = (f.mean(1) - q.mean(1)).abs().mean(0)
    dvar = (var_f - q.var(1, unbiased=False)).abs().mean(0)
    term = dmu + dvar
    top = term.sort(descending=True)
    print(f"| {i} | {term.mean():.4f} | {top.values[:5].sum() / term.sum():.2f} | {top.indices[:5].tolist()} | "
          f"{var_f.mean(0).median():.3g} | {var_f.mean(0).max():.3g} | {(dvar / var_f.mean(0)).mean():.3f} |")
