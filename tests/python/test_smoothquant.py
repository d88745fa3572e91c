"""SmoothQuant: the C++ statistics and factors against torch twins, smoothing
that leaves every architecture's float outputs unchanged, W8A8 close to float,
activation quantization seen by the tweak, export round trips and errors."""

import json

import pytest
import torch
import transformers as tf
from test_pipeline import ARCHS, calib, tiny

import normtweak as nt
from normtweak import export
from normtweak.models import block_norms, blocks, get_adapter, get_module
from normtweak.pipeline import capture_block_inputs
from normtweak.smoothquant import ALPHA_GRID, fake_quant_per_token, fake_quant_static, smooth_block, static_act_scales
from normtweak.tweak import _first

# Smoothing rescales weights by s and norms by 1/s in float64 before rounding
# back to float32: outputs move by float32 rounding only.
SMOOTH_REL = 1e-5
# W8A8 (per-channel weights, per-token activations) on a tiny random model:
# logits within a few percent of float.
W8A8_REL = 5e-2


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_act_absmax_and_factors_match_torch(layer):
    W, X = layer
    acc = nt.ActAbsMax(X.shape[1])
    for part in X.split(300):
        acc.add_batch(part.half() if part.shape[0] < 300 else part)
    amax = X.abs().amax(0)
    tail = X.shape[0] % 300
    amax_ref = torch.maximum(X[: X.shape[0] - tail].abs().amax(0), X[X.shape[0] - tail :].half().float().abs().amax(0))
    assert acc.tokens == X.shape[0] and torch.equal(acc.absmax(), amax_ref)
    W2 = W[: W.shape[0] // 2] * 3
    for alpha in (0.0, 0.5, 0.85, 1.0):
        s = nt.smooth_factors(amax, [W, W2], alpha)
        w = torch.maximum(W.abs().amax(0), W2.abs().amax(0)).double()
        ref = amax.double().clamp_min(1e-5) ** alpha / w.clamp_min(1e-5) ** (1 - alpha)
        assert rel(s.double(), ref) < 1e-6
    s = nt.smooth_factors(amax, [W], 0.5)
    r = nt.smoothquant_quantize(W, s, bits=8)
    assert r.method == "smoothquant" and torch.equal(r.smooth, s)
    assert torch.equal(r.codes, nt.rtn_quantize(W * s, bits=8).codes)
    assert rel((X / s) @ r.Q.t(), X @ W.t()) < 1e-2


@pytest.mark.parametrize("arch", ARCHS)
def test_smoothing_leaves_the_float_model_unchanged(arch):
    model = tiny(arch)
    ids = calib(n=4, seqlen=16)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    adapter = get_adapter(model)
    inputs, kwargs = capture_block_inputs(model, ids)
    moved = []
    for i, block in enumerate(blocks(model)):
        rep = smooth_block(block, adapter, block_norms(block, adapter), inputs, kwargs, alpha=0.5, wbits=8,
                           group_size=-1, sym=True, abits=16, prefix=f"b{i}")
        moved += [r["max_after"] < r["max_before"] for r in rep]
        with torch.no_grad():
            inputs = [_first(block(x, **kwargs)) for x in inputs]
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert rel(after, before) < SMOOTH_REL
    assert len(moved) == (2 + len(adapter.linear_pairs)) * len(blocks(model)) and sum(moved) >= len(moved) // 2


def test_linear_pairs_share_factors_across_grouped_query_heads():
    """v_proj -> o_proj under GQA (4 query heads, 2 key/value heads) and up -> down: each consumer input channel is
    scaled by the factor of the producer channel it reads, and the block's output does not move."""
    model = tiny("llama")
    adapter = get_adapter(model)
    block = blocks(model)[0]
    inputs, kwargs = capture_block_inputs(model, calib(n=4, seqlen=16))
    v0, o0 = (get_module(block, n).weight.detach().clone() for n in ("self_attn.v_proj", "self_attn.o_proj"))
    with torch.no_grad():
        ref = [_first(block(x, **kwargs)) for x in inputs]
    rep = smooth_block(block, adapter, block_norms(block, adapter), inputs, kwargs, alpha=0.5, wbits=8,
                       group_size=-1, sym=True, abits=16, prefix="b0")
    assert [r["pair"] for r in rep][2:] == ["b0.self_attn.v_proj->self_attn.o_proj", "b0.mlp.up_proj->mlp.down_proj"]
    v1, o1 = (get_module(block, n).weight.detach() for n in ("self_attn.v_proj", "self_attn.o_proj"))
    kv_channels, d = v1.shape[0], block.self_attn.head_dim
    group = o1.shape[1] // kv_channels
    assert group == 2
    s_o = (o1 / o0)[0].double()  # o_proj column j was multiplied by the factor of the v channel it reads
    assert rel(s_o.view(-1, group, d), s_o.view(-1, group, d)[:, :1].expand(-1, group, d)) < 1e-6
    # v_proj = v0 diag(s_norm) / s_v[:, None]: column 0 gives s_v up to the constant s_norm[0].
    s_v = (v0[:, 0] / v1[:, 0]).double()
    shared = s_o.view(-1, group, d)[:, 0].reshape(-1)
    assert rel(shared / shared[0], s_v / s_v[0]) < 1e-5
    assert (s_o - 1).abs().max() > 1e-2  # the factors are not all one
    with torch.no_grad():
        out = [_first(block(x, **kwargs)) for x in inputs]
    assert max(rel(a, b) for a, b in zip(out, ref)) < SMOOTH_REL


def test_w8a8_is_close_to_float_and_the_tweak_sees_activation_quantization(tmp_path):
    model, ref = tiny("llama"), tiny("llama")
    ids = calib()
    cfg = nt.GPTQConfig(method="smoothquant", bits=8, group_size=-1, abits=8)
    rep = nt.pipeline.quantize(model, ids, cfg, nt.TweakConfig(lr=1e-3), progress=False)
    assert all(len(b["smoothing"]) == 4 for b in rep.blocks)  # 2 norm pairs, v -> o, up -> down
    x = calib(2, seed=9)
    with torch.no_grad():
        f, q = ref(input_ids=x).logits, model(input_ids=x).logits
    assert rel(q, f) < W8A8_REL
    # The activation quantizers are live: removing them changes the block output.
    lin = get_module(blocks(model)[0], "self_attn.q_proj")
    assert lin._normtweak_abits == 8
    h = torch.randn(1, 5, lin.in_features)
    with torch.no_grad():
        y_q = lin(h)
        y_f = torch.nn.functional.linear(h, lin.weight)
    assert not torch.equal(y_q, y_f) and rel(y_q, y_f) < 2e-2
    # And the straight-through estimator lets gradients through.
    h.requires_grad_(True)
    lin(h).sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
    # Fake-quant export records the scheme and reloads with the activation quantizers attached.
    out = export.save_fake(model, None, tmp_path / "w8a8")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "normtweak-fake" and qc["activations"]["bits"] == 8
    assert qc["weights"]["method"] == "rtn" and qc["weights"]["bits"] == 8
    loaded, _, _ = export.load_quantized(out)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, q)
    plain = tf.AutoModelForCausalLM.from_pretrained(out).eval()  # transformers ignores the unknown method
    with torch.no_grad():
        assert rel(plain(input_ids=x).logits, q) < W8A8_REL
    with pytest.raises(ValueError, match="--format fake"):
        export.save_gptq(model, None, tmp_path / "g")


def test_alpha_search_and_gptq_weights_under_smoothing():
    model = tiny("opt")
    ids = calib()
    cfg = nt.GPTQConfig(method="smoothquant", bits=4, group_size=32, abits=8, alpha=None, weight_method="gptq")
    rep = nt.pipeline.quantize(model, ids, cfg, None, progress=False)
    alphas = [p["alpha"] for b in rep.blocks for p in b["smoothing"]]
    # W4A8: the weights are the narrower side, so only the two norm pairs are smoothed by default; None is a pair
    # the search left unsmoothed.
    assert len(alphas) == 2 * len(rep.blocks) and set(alphas) <= {None, *ALPHA_GRID}
    both = nt.GPTQConfig(method="smoothquant", bits=4, group_size=32, abits=8, alpha=None, smooth_linear=True)
    assert both.smooths_linear_pairs and nt.GPTQConfig(method="smoothquant", bits=4, abits=4).smooths_linear_pairs
    rep = nt.pipeline.quantize(tiny("opt"), ids, both, None, progress=False)
    assert all(len(b["smoothing"]) == 3 and b["smoothing"][2]["pair"].endswith("v_proj->self_attn.out_proj")
               for b in rep.blocks)
    assert all(m._normtweak_quant.method == "gptq" for m in model.modules() if hasattr(m, "_normtweak_quant"))


def test_fake_quant_per_token():
    x = torch.tensor([[1.0, -0.6, 0.26], [100.0, 1.0, -3.0]])
    q = fake_quant_per_token(x, 4)  # qmax 7: scales 1/7 and 100/7
    assert torch.allclose(q[0], torch.tensor([1.0, -4 / 7, 2 / 7]))
    assert torch.allclose(q[1], torch.tensor([100.0, 0.0, 0.0]))


def test_fake_quant_static_clips_and_passes_gradients():
    x = torch.tensor([[0.5, -0.26, 3.0, -9.0]], requires_grad=True)
    q = fake_quant_static(x, 4, 0.25)  # grid -8..7 steps of 0.25: [-2, 1.75]
    assert torch.equal(q.detach(), torch.tensor([[0.5, -0.25, 1.75, -2.0]]))
    q.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_static_activation_scales_from_calibration(tmp_path):
    """--act-static: each Linear's scale is max|input| / 127 over the calibration tokens (checked on q_proj against
    the norm's output computed directly), the scheme and scales survive export and a checkpoint resume."""
    model, ref = tiny("llama"), tiny("llama")
    block = blocks(model)[0]
    inputs, kwargs = capture_block_inputs(model, calib())
    with torch.no_grad():
        want = max(block.input_layernorm(x).abs().max().item() for x in inputs) / 127
    got = static_act_scales(block, ["self_attn.q_proj", "mlp.down_proj"], inputs, kwargs, 8)
    assert got["self_attn.q_proj"] == pytest.approx(want, rel=1e-6) and got["mlp.down_proj"] > 0
    cfg = nt.GPTQConfig(method="smoothquant", bits=8, group_size=-1, abits=8, act_static=True)
    nt.pipeline.quantize(model, calib(), cfg, None, progress=False, checkpoint=str(tmp_path / "ck"))
    lins = [m for m in model.modules() if getattr(m, "_normtweak_abits", 16) == 8]
    assert len(lins) == 7 * len(blocks(model)) and all(m._normtweak_act_scale > 0 for m in lins)
    x = calib(2, seed=9)
    with torch.no_grad():
        f, q = ref(input_ids=x).logits, model(input_ids=x).logits
    assert rel(q, f) < W8A8_REL
    out = export.save_fake(model, None, tmp_path / "w8a8s")
    acts = json.loads((out / "config.json").read_text())["quantization_config"]["activations"]
    assert acts["scheme"] == "per-tensor static symmetric" and not acts["dynamic"]
    assert len(acts["scales"]) == len(lins)
    loaded, _, _ = export.load_quantized(out)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, q)
    # A resume from the per-block checkpoints restores the static scales, not dynamic ones.
    resumed = tiny("llama")
    nt.pipeline.quantize(resumed, calib(), cfg, None, progress=False, checkpoint=str(tmp_path / "ck"), resume=True)
    with torch.no_grad():
        assert torch.equal(resumed(input_ids=x).logits, q)


def test_smoothquant_errors_name_the_setting():
    with pytest.raises(ValueError, match="--act-static"):
        nt.GPTQConfig(act_static=True)
    with pytest.raises(ValueError, match="alpha=1.5"):
        nt.GPTQConfig(method="smoothquant", alpha=1.5)
    with pytest.raises(ValueError, match="abits=3"):
        nt.GPTQConfig(abits=3)
    with pytest.raises(ValueError, match="weight_method='awq'"):
        nt.GPTQConfig(method="smoothquant", weight_method="awq")
    with pytest.raises(ValueError, match="alpha=2"):
        nt.smooth_factors(torch.ones(4), [torch.ones(2, 4)], 2.0)
