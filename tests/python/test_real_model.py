"""End to end on a slice of the real model: the first blocks of SmolLM2-135M
(dequantized from the bundled GGUF), GPTQ at 3 bits, Norm Tweaking calibrated
on Austen's Emma, checked on held-out text (Persuasion)."""

import copy

import pytest
import torch

import normtweak as nt
from normtweak.calibration import text_calibration

BLOCKS = 4


@pytest.fixture(scope="module")
def smollm2_slice():
    from normtweak.corpora import english_text
    from normtweak.models import load_model

    model, tok = load_model("smollm2-135m")
    model.model.layers = model.model.layers[:BLOCKS]
    model.config.num_hidden_layers = BLOCKS
    return model, tok, english_text("emma"), english_text("persuasion")


def block_outputs(model, ids):
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    return [h.reshape(-1, h.shape[-1]) for h in hs[1:BLOCKS]]  # outputs of blocks 0..BLOCKS-2 (the last is normed)


def test_tweaking_lowers_the_distribution_loss_on_held_out_text(smollm2_slice):
    model, tok, train_text, held_text = smollm2_slice
    calib = text_calibration(tok, train_text, n=8, seqlen=128, seed=0)
    held = text_calibration(tok, held_text, n=4, seqlen=128, seed=1)
    cfg = nt.GPTQConfig(bits=3, group_size=128, act_order=True)
    plain, tweaked = copy.deepcopy(model), copy.deepcopy(model)
    nt.pipeline.quantize(plain, calib, cfg, None, progress=False)
    rep = nt.pipeline.quantize(tweaked, calib, cfg, nt.TweakConfig(lr=1e-4, rollback=False), progress=False)
    assert all(b["tweak"]["loss_after"] < b["tweak"]["loss_before"] for b in rep.blocks)
    f = block_outputs(model, held)
    d_plain = [nt.channel_dist_loss(q, t).item() for q, t in zip(block_outputs(plain, held), f)]
    d_tweak = [nt.channel_dist_loss(q, t).item() for q, t in zip(block_outputs(tweaked, held), f)]
    assert sum(d_tweak) < sum(d_plain), (d_plain, d_tweak)
