"""End to end on a slice of the real model: the first blocks of SmolLM2-135M
(dequantized from the bundled GGUF), GPTQ and RTN at 3 bits, Norm Tweaking
calibrated on Austen's Emma, checked on held-out text (Emma's second half, Persuasion)."""

import copy

import pytest
import torch

import normtweak as nt
from normtweak.calibration import text_calibration

BLOCKS = 4


@pytest.fixture(scope="module")
def smollm2_slice():
    from normtweak.corpora import english_text
    from normtweak.models import keep_first_blocks, load_model

    model, tok = load_model("smollm2-135m")
    keep_first_blocks(model, BLOCKS)
    return model, tok, english_text("emma"), english_text("persuasion")


def block_outputs(model, ids):
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    return hs[1:BLOCKS]  # outputs [n, seqlen, C] of blocks 0..BLOCKS-2 (the last is normed)


def per_sample_dist_loss(quant, ref):
    """The tweak's own objective on held-out text: eq. 2 over each sample's tokens, averaged over samples."""
    return sum(nt.channel_dist_loss(q, f).item() for q, f in zip(quant, ref)) / len(ref)


def test_tweaking_lowers_the_distribution_loss_on_held_out_text(smollm2_slice):
    """Calibration: 64 x 256 tokens of the first half of Emma (the table's amount; with 8 x 128 tokens the tweak fits
    the calibration windows and held-out loss rises). The tweak runs after quantization on the same weights (inside
    the walk every later block's quantization would change too). Held out: Emma's second half and Persuasion.

    The held-out check uses RTN weights: they do not depend on the order of floating-point sums. GPTQ's block 2 at 3
    bits does, and on GPTQ weights the tweak's held-out effect in that block changed sign between machines and thread
    counts (-1% to +4% while blocks 0-1 fell 2-4%; docs/findings.md), so a check there would test rounding luck."""
    model, tok, train_text, held_text = smollm2_slice
    half = len(train_text) // 2
    calib = text_calibration(tok, train_text[:half], n=64, seqlen=256, seed=0)
    quantized = {}
    for method in ("gptq", "rtn"):
        plain = copy.deepcopy(model)
        nt.pipeline.quantize(plain, calib, nt.GPTQConfig(bits=3, group_size=128, act_order=True, method=method),
                             None, progress=False)
        tweaked = copy.deepcopy(plain)
        rep = nt.tweak(model, tweaked, calib, nt.TweakConfig(lr=1e-5, rollback=False), progress=False)
        assert all(b["tweak"]["loss_after"] < b["tweak"]["loss_before"] for b in rep.blocks), (method, rep.blocks)
        quantized[method] = plain, tweaked
    plain, tweaked = quantized["rtn"]
    for text in (train_text[half:], held_text):
        held = text_calibration(tok, text, n=8, seqlen=256, seed=1)
        f = block_outputs(model, held)
        d_plain = [per_sample_dist_loss(q, t) for q, t in zip(block_outputs(plain, held), f)]
        d_tweak = [per_sample_dist_loss(q, t) for q, t in zip(block_outputs(tweaked, held), f)]
        print("held-out dist loss per block, RTN vs RTN + NT:", d_plain, d_tweak)
        assert all(t < p for p, t in zip(d_plain, d_tweak)), (d_plain, d_tweak)
