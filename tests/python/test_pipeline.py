"""The block walker on tiny random models of every supported architecture,
export/reload and post-step round trips, and errors."""

import copy
import dataclasses
import importlib

import pytest
import torch
import transformers as tf

import normtweak as nt
from normtweak import export
from normtweak.models import ADAPTERS, block_norms, blocks, get_adapter, keep_first_blocks
from normtweak.tweak import _first

TWEAK = importlib.import_module("normtweak.tweak")  # the module: nt.tweak is the post-step function

HIDDEN, LAYERS, VOCAB = 64, 2, 128


def tiny(arch: str):
    common = dict(vocab_size=VOCAB, num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=4)
    configs = {
        "llama": lambda: tf.LlamaConfig(intermediate_size=128, num_key_value_heads=2, **common),
        "qwen2": lambda: tf.Qwen2Config(intermediate_size=128, num_key_value_heads=2, **common),
        "mistral": lambda: tf.MistralConfig(intermediate_size=128, num_key_value_heads=2, **common),
        "gemma": lambda: tf.GemmaConfig(intermediate_size=128, num_key_value_heads=2, head_dim=16, **common),
        "opt": lambda: tf.OPTConfig(vocab_size=VOCAB, num_hidden_layers=LAYERS, hidden_size=HIDDEN,
                                    num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=HIDDEN),
        "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_layer=LAYERS, n_embd=HIDDEN, n_head=4),
        "bloom": lambda: tf.BloomConfig(vocab_size=VOCAB, n_layer=LAYERS, hidden_size=HIDDEN, n_head=4),
        "gpt_neox": lambda: tf.GPTNeoXConfig(intermediate_size=128, **common),
    }
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(configs[arch](), dtype=torch.float32).eval()
    # Random init norms are exactly 1/0: perturb them so the tweak has a real starting point.
    with torch.no_grad():
        for blk in blocks(model):
            for n in block_norms(blk, get_adapter(model)):
                n.module.weight.mul_(1 + 0.1 * torch.randn_like(n.module.weight))
    return model


def calib(n=8, seqlen=32, seed=0):
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


ARCHS = ["llama", "qwen2", "mistral", "gemma", "opt", "gpt2", "bloom", "gpt_neox"]


def test_every_adapter_is_tested():
    assert set(ARCHS) == set(ADAPTERS)


@pytest.mark.parametrize("arch", ARCHS)
def test_keep_first_blocks_runs_and_reloads_as_the_shorter_model(tmp_path, arch):
    model = tiny(arch)
    first = blocks(model)[0]
    with pytest.raises(ValueError, match=f"n=0 is outside 1..{LAYERS}"):
        keep_first_blocks(model, 0)
    with pytest.raises(ValueError, match=f"n={LAYERS + 1} is outside"):
        keep_first_blocks(model, LAYERS + 1)
    assert keep_first_blocks(model, 1) is model
    assert len(blocks(model)) == 1 and blocks(model)[0] is first and model.config.num_hidden_layers == 1
    ids = calib(n=2)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    again = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert len(blocks(again)) == 1
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_and_tweak_every_architecture(arch):
    model = tiny(arch)
    ids = calib()
    with torch.no_grad():
        ref = model(input_ids=ids[:2]).logits
    before = {k: v.clone() for k, v in model.state_dict().items() if "norm" in k or "ln_" in k}
    report = nt.pipeline.quantize(model, ids, nt.GPTQConfig(bits=3, group_size=32),
                                  nt.TweakConfig(lr=1e-3), progress=False)
    assert len(report.blocks) == LAYERS
    for b in report.blocks:
        t = b["tweak"]
        assert t["steps"] == 8
        assert t["loss_after"] <= t["loss_before"]
        assert b["delta_mu"] >= 0 and b["delta_var"] >= 0
    # Every quantized Linear holds its grid values.
    adapter = get_adapter(model)
    for blk in blocks(model):
        for group in adapter.groups:
            for name in group:
                mod = blk.get_submodule(name)
                r = mod._normtweak_quant
                W = nt.models.linear_weight(mod, adapter)
                g = r.g_idx.long()
                assert r.Q is None  # no second float copy kept
                assert torch.equal(W, r.scales[:, g] * (r.codes.float() - r.zeros[:, g]))
    with torch.no_grad():
        out = model(input_ids=ids[:2]).logits
    assert torch.isfinite(out).all()
    assert not torch.equal(out, ref)
    after = {k: v for k, v in model.state_dict().items() if k in before}
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    rolled = all(b["tweak"]["rolled_back"] for b in report.blocks)
    assert changed or rolled


def test_tweak_lowers_the_loss_on_held_out_inputs():
    model = tiny("llama")
    ids, held = calib(16, 32, 1), calib(8, 32, 2)
    report = nt.pipeline.quantize(model, ids, nt.GPTQConfig(bits=2, group_size=32), nt.TweakConfig(lr=3e-3),
                                  progress=False)
    improved = [b for b in report.blocks if b["tweak"]["loss_after"] < b["tweak"]["loss_before"]]
    assert improved, report.blocks
    # Held-out tokens: block 0 sees the same embeddings in all three models, so its
    # output isolates the tweak's effect; it must be closer in distribution to the float one.
    fl = tiny("llama")
    q_notweak = tiny("llama")
    nt.pipeline.quantize(q_notweak, ids, nt.GPTQConfig(bits=2, group_size=32), None, progress=False)

    def last_hidden(m):
        with torch.no_grad():
            return m(input_ids=held, output_hidden_states=True).hidden_states[1]

    f = last_hidden(fl).reshape(-1, HIDDEN)
    d_tweak = nt.channel_dist_loss(last_hidden(model).reshape(-1, HIDDEN), f).item()
    d_plain = nt.channel_dist_loss(last_hidden(q_notweak).reshape(-1, HIDDEN), f).item()
    assert d_tweak < d_plain


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gptq_export_reload_and_post_step(tmp_path, arch):
    model = tiny(arch)
    ids = calib()
    nt.pipeline.quantize(model, ids, nt.GPTQConfig(bits=4, group_size=32, act_order=True), None, progress=False)
    out = export.save_gptq(model, None, tmp_path / "q")
    assert not (tmp_path / "q.tmp").exists()
    cfg = __import__("json").loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"], qc["checkpoint_format"]) == (4, 32, True, True,
                                                                                                   "gptq")
    loaded, _, packed = export.load_quantized(out)
    assert len(packed) == LAYERS * sum(len(g) for g in get_adapter(model).groups)
    with torch.no_grad():
        a = model(input_ids=ids[:2]).logits
        b = loaded(input_ids=ids[:2]).logits
    # The checkpoint stores float16 scales; logits agree to that precision.
    assert ((a - b).norm() / a.norm()).item() < 1e-2
    # Post-step: tweak the reloaded quantized model against a float original.
    fl = tiny(arch)
    rep = nt.tweak(fl, loaded, ids, nt.TweakConfig(lr=1e-3), progress=False)
    assert rep.layers_quantized == 0 and len(rep.blocks) == LAYERS
    for name, t in packed.items():  # weights untouched by the post-step
        W = nt.models.linear_weight(loaded.get_submodule(name), get_adapter(loaded))
        u = nt.unpack_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4)
        g = u["g_idx"].long()
        assert torch.equal(W, u["scales"][:, g] * (u["codes"].float() - u["zeros"][:, g]))


def test_fake_quant_export_loads_in_plain_transformers(tmp_path):
    model = tiny("llama")
    nt.pipeline.quantize(model, calib(), nt.GPTQConfig(bits=3, group_size=32, method="rtn"), None, progress=False)
    out = export.save_fake(model, None, tmp_path / "fake")
    plain = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = calib(2)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_errors_name_the_problem(tmp_path):
    class Fake(torch.nn.Module):
        config = type("C", (), {"model_type": "t5"})()

    with pytest.raises(ValueError, match="unsupported architecture model_type='t5'"):
        get_adapter(Fake())
    a = tiny("llama")
    b_cfg = tf.LlamaConfig(vocab_size=VOCAB, num_hidden_layers=3, hidden_size=HIDDEN, num_attention_heads=4,
                           intermediate_size=128, num_key_value_heads=2)
    b = tf.AutoModelForCausalLM.from_config(b_cfg).eval()
    with pytest.raises(ValueError, match="float model has 2 blocks but the quantized model has 3"):
        nt.tweak(a, b, calib(), progress=False)
    with pytest.raises(ValueError, match="different architectures"):
        nt.tweak(tiny("opt"), a, calib(), progress=False)
    with pytest.raises(ValueError, match="bits=9"):
        nt.GPTQConfig(bits=9)
    with pytest.raises(ValueError, match="no config.json"):
        export.load_quantized(tmp_path)
    with pytest.raises(ValueError, match="not a bundled name"):
        nt.models.load_model(str(tmp_path))


def test_learning_rate_search_keeps_the_best_on_held_out_samples():
    from normtweak.search import heldout_kl, norm_state, split_holdout

    model = tiny("llama")
    ref = tiny("llama")
    ids = calib(n=8, seqlen=32)
    tweak = nt.TweakConfig(lr_grid=(1e-3, 1e-2), holdout=0.25)
    rep = nt.pipeline.quantize(model, ids, nt.GPTQConfig(bits=3, group_size=32), tweak, progress=False)
    s = rep.lr_search
    assert s["holdout_samples"] == 2 and [lr for lr, _ in s["table"]] == [1e-3, 1e-2]
    assert rep.layers_quantized == LAYERS * 7 and len(rep.blocks) == LAYERS
    # The reported KL is the model's own, measured on the held-out samples the tweak never saw.
    _, hold = split_holdout(ids, 0.25)
    assert heldout_kl(ref, model, hold) == pytest.approx(s["kl"], rel=1e-5)
    kls = [kl for _, kl in s["table"]]
    if s["lr"] is None:
        assert s["kl"] == s["kl_untweaked"] and min(kls) >= s["kl_untweaked"]
    else:
        assert s["kl"] == min(kls) <= s["kl_untweaked"] and dict(s["table"])[s["lr"]] == s["kl"]
    # A grid of absurd rates loses to the untweaked model: the norms are left as they were.
    before = norm_state(model)
    rep2 = nt.tweak(ref, model, ids, nt.TweakConfig(lr_grid=(50.0,), holdout=0.25, rollback=False), progress=False)
    assert rep2.lr_search["lr"] is None
    assert all(torch.equal(a, b) for a, b in zip(before, norm_state(model)))
    with pytest.raises(ValueError, match="non-positive"):
        nt.TweakConfig(lr_grid=(1e-3, 0.0))
    with pytest.raises(ValueError, match="too few"):
        nt.tweak(ref, model, ids[:1], nt.TweakConfig(lr_grid=(1e-3,)), progress=False)


def test_tweak_order_after_is_quantize_then_post_step():
    model = tiny("llama")
    ids = calib()
    cfg = nt.GPTQConfig(bits=3, group_size=32)
    tweak = nt.TweakConfig(lr=1e-3, order="after")
    a = copy.deepcopy(model)
    rep = nt.pipeline.quantize(a, ids, cfg, tweak, progress=False)
    b, ref = copy.deepcopy(model), copy.deepcopy(model)
    nt.pipeline.quantize(b, ids, cfg, None, progress=False)
    nt.tweak(ref, b, ids, nt.TweakConfig(lr=1e-3), progress=False)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert rep.tweak["order"] == "after" and rep.layers_quantized > 0
    assert all(blk["tweak"] is not None for blk in rep.blocks)
    walk = copy.deepcopy(model)
    nt.pipeline.quantize(walk, ids, cfg, nt.TweakConfig(lr=1e-3), progress=False)
    assert any(not torch.equal(x, y) for x, y in zip(walk.state_dict().values(), a.state_dict().values()))
    with pytest.raises(ValueError, match="cover the in-walk order only"):
        nt.pipeline.quantize(copy.deepcopy(model), ids, cfg, tweak, progress=False, checkpoint="/nonexistent")
    with pytest.raises(ValueError, match="order='later' is not 'walk' or 'after'"):
        nt.TweakConfig(order="later")


def test_tweak_target_float_is_the_float_models_own_activations(tmp_path, monkeypatch):
    """target="float": block l is tweaked toward the float model's block-l output on the float path (hooks on an
    untouched float copy), not toward the float block on the quantized activations; a resume from the per-block
    checkpoints carries those float activations and ends where an uninterrupted run does."""
    import normtweak.pipeline as pl

    model, ids, cfg = tiny("llama"), calib(), nt.GPTQConfig(bits=2, group_size=32)
    fl = copy.deepcopy(model)
    want = {i: [] for i in range(LAYERS)}
    hooks = [blk.register_forward_hook(lambda m, a, out, i=i: want[i].append(_first(out).detach().clone()))
             for i, blk in enumerate(blocks(fl))]
    with torch.no_grad():
        for x in ids:
            fl(input_ids=x[None], use_cache=False)
    for h in hooks:
        h.remove()
    seen = {}
    original = pl.tweak_block

    def spy(block, norms, inputs, targets, kwargs, tweak, i, L, **kw):
        seen.setdefault((tweak.target, i), [t.clone() for t in targets])
        return original(block, norms, inputs, targets, kwargs, tweak, i, L, **kw)

    monkeypatch.setattr(pl, "tweak_block", spy)
    results = {}
    for target in ("local", "float"):
        m = copy.deepcopy(model)
        nt.pipeline.quantize(m, ids, cfg, nt.TweakConfig(lr=1e-3, target=target), progress=False)
        results[target] = m.state_dict()
    for i in range(LAYERS):
        got = torch.cat(seen[("float", i)]).reshape(-1, HIDDEN)
        assert torch.allclose(got, torch.cat(want[i]).reshape(-1, HIDDEN), rtol=1e-5, atol=1e-5), i
    # Block 0 sees the embeddings either way; from block 1 on the quantized path has drifted from the float one.
    last = LAYERS - 1
    assert not torch.allclose(torch.cat(seen[("local", last)]), torch.cat(seen[("float", last)]), atol=1e-3)
    assert any(not torch.equal(results["local"][k], v) for k, v in results["float"].items())

    # Killed after block 0's checkpoint, then resumed: the same model as the uninterrupted run.
    def dies_at_block_1(block, norms, inputs, targets, kwargs, tweak, i, L, **kw):
        if i == 1:
            raise KeyboardInterrupt
        return original(block, norms, inputs, targets, kwargs, tweak, i, L, **kw)

    tweak = nt.TweakConfig(lr=1e-3, target="float")
    monkeypatch.setattr(pl, "tweak_block", dies_at_block_1)
    with pytest.raises(KeyboardInterrupt):
        nt.pipeline.quantize(copy.deepcopy(model), ids, cfg, tweak, progress=False, checkpoint=str(tmp_path / "ck"))
    monkeypatch.setattr(pl, "tweak_block", original)
    resumed = copy.deepcopy(model)
    nt.pipeline.quantize(resumed, ids, cfg, tweak, progress=False, checkpoint=str(tmp_path / "ck"), resume=True)
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, results["float"][k]), k
    with pytest.raises(ValueError, match="target='global' is not 'local' or 'float'"):
        nt.TweakConfig(target="global")


def load_bench():
    """benchmarks/bench_accuracy.py as a module (it is a script, not part of the package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "bench_accuracy", Path(__file__).resolve().parents[2] / "benchmarks" / "bench_accuracy.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_weights_cache_reuses_the_same_gptq(tmp_path, monkeypatch):
    """bench_accuracy --weights-cache: a second identical quantization loads the first one's Linear weights
    (a post-step on them then equals order='after' end to end); another calibration set quantizes afresh."""
    bench = load_bench()
    model = tiny("llama")
    ids = calib()
    cfg = nt.GPTQConfig(bits=3, group_size=32)
    a = copy.deepcopy(model)
    bench.quantize_cached(a, ids, cfg, tmp_path)
    assert len(list(tmp_path.glob("weights-*.pt"))) == 1
    b, ref = copy.deepcopy(model), copy.deepcopy(model)
    with monkeypatch.context() as m:  # the second run must load, not quantize
        m.setattr(nt.pipeline, "quantize", lambda *a, **k: pytest.fail("quantized again despite the cache"))
        bench.quantize_cached(b, ids, cfg, tmp_path)
    assert bench.linear_sha(b) == bench.linear_sha(a) != bench.linear_sha(model)
    nt.pipeline.quantize(b, ids, cfg, nt.TweakConfig(lr=1e-3, order="after"), progress=False, float_model=ref)
    c = copy.deepcopy(model)
    nt.pipeline.quantize(c, ids, cfg, nt.TweakConfig(lr=1e-3, order="after"), progress=False)
    for (k, vb), vc in zip(b.state_dict().items(), c.state_dict().values()):
        assert torch.equal(vb, vc), k
    bench.quantize_cached(copy.deepcopy(model), calib(seed=1), cfg, tmp_path)
    assert len(list(tmp_path.glob("weights-*.pt"))) == 2
    pkg = tmp_path / "pkg"  # the key covers the package's code: an edit quantizes afresh, the same code does not
    pkg.mkdir()
    (pkg / "gptq.py").write_text("v1")
    monkeypatch.setattr(nt, "__file__", str(pkg / "__init__.py"))
    for code, files in (("v1", 3), ("v1", 3), ("v2", 4)):
        (pkg / "gptq.py").write_text(code)
        bench.quantize_cached(copy.deepcopy(model), ids, cfg, tmp_path)
        assert len(list(tmp_path.glob("weights-*.pt"))) == files


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("which", ["final", "all"])
def test_kl_tweak_every_architecture(arch, which):
    """The adapter's final norm and head_logits rebuild the model's own logits from the last block's output; the KL
    tweak then lowers the quantized model's true next-token KL to the float model, and moves the norms it names."""
    from normtweak.models import final_norm, head_logits
    from normtweak.search import heldout_kl, norm_state

    model = tiny(arch)
    norm = final_norm(model)
    with torch.no_grad():
        norm.module.weight.mul_(1 + 0.1 * torch.randn_like(norm.module.weight))
    ref = copy.deepcopy(model)
    ids = calib()
    last = []
    hook = blocks(model)[-1].register_forward_hook(lambda m, a, out: last.append(_first(out)))
    with torch.no_grad():
        logits = model(input_ids=ids[:2]).logits
        hook.remove()
        torch.testing.assert_close(head_logits(model, norm.module(last[0])), logits)
    plain = copy.deepcopy(model)
    cfg = nt.GPTQConfig(bits=2, group_size=32)
    nt.pipeline.quantize(plain, ids, cfg, nt.TweakConfig(lr=1e-3), progress=False)
    rep = nt.pipeline.quantize(model, ids, cfg, nt.TweakConfig(lr=1e-3, kl_norms=which, kl_lr=3e-3, kl_passes=3),
                               progress=False)
    f = rep.kl_tweak
    assert f["steps"] == 3 * 8 and not f["rolled_back"] and f["loss_after"] < f["loss_before"]
    assert f["loss_after"] == pytest.approx(heldout_kl(ref, model, ids), rel=1e-4)
    # the KL stage starts where the paper's walk ends: same weights, same block norms
    assert f["loss_before"] == pytest.approx(heldout_kl(ref, plain, ids), rel=1e-4)
    moved = [not torch.equal(a, b) for a, b in zip(norm_state(plain), norm_state(model))]
    k = len(norm.params)  # the final norm's entries come last
    assert any(moved[-k:]) and (any(moved[:-k]) if which == "all" else not any(moved[:-k]))
    assert all(p.requires_grad for p in model.parameters())


def test_kl_stage_alone_after_a_block_tweak_equals_the_two_in_one_call():
    """passes=0 runs the KL stage without the per-block tweak: after a paper-only post-step it gives exactly what
    one call with both gives (the walk carries the same activations); "final" leaves every block norm as it was."""
    from normtweak.models import final_norm
    from normtweak.search import norm_state

    model, ref = tiny("llama"), tiny("llama")
    ids = calib()
    nt.pipeline.quantize(model, ids, nt.GPTQConfig(bits=2, group_size=32), None, progress=False)
    both, split = copy.deepcopy(model), copy.deepcopy(model)
    cfg = nt.TweakConfig(lr=1e-3, kl_norms="all", kl_lr=3e-3)
    rep = nt.tweak(ref, both, ids, cfg, progress=False)
    nt.tweak(ref, split, ids, dataclasses.replace(cfg, kl_norms="off"), progress=False)
    before = [t.clone() for t in norm_state(split)]
    float_runs = []  # with nothing tweaked per block, each float block sees each sample once: the float path alone
    hook = blocks(ref)[0].register_forward_hook(lambda m, args, out: float_runs.append(args[0].shape[0]))
    rep0 = nt.tweak(ref, split, ids, dataclasses.replace(cfg, passes=0), progress=False)
    hook.remove()
    assert sum(float_runs) == len(ids)
    assert all(b["tweak"] is None for b in rep0.blocks)
    assert rep0.kl_tweak == rep.kl_tweak and not rep.kl_tweak["rolled_back"]
    for a, b in zip(norm_state(both), norm_state(split)):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(before, norm_state(split)))
    final = copy.deepcopy(model)
    nt.tweak(ref, final, ids, nt.TweakConfig(passes=0, kl_norms="final", kl_lr=3e-3), progress=False)
    k = len(final_norm(final).params)
    after, start = norm_state(final), norm_state(model)
    assert all(torch.equal(a, b) for a, b in zip(after[:-k], start[:-k]))
    assert any(not torch.equal(a, b) for a, b in zip(after[-k:], start[-k:]))
    block = blocks(model)[0]
    with pytest.raises(ValueError, match="passes=0 would not tweak anything"):
        nt.tweak_block(block, block_norms(block, get_adapter(model)), [], [], {},
                       nt.TweakConfig(passes=0, kl_norms="all"), 0, 1)


def test_kl_tweak_post_step_and_in_the_lr_search():
    """Post-step, the float targets come from the float model; a losing lr0 leaves the final norm untouched too."""
    from normtweak.models import final_norm
    from normtweak.search import heldout_kl

    model, ref = tiny("llama"), tiny("llama")
    ids = calib()
    nt.pipeline.quantize(model, ids, nt.GPTQConfig(bits=3, group_size=32), None, progress=False)
    rep = nt.tweak(ref, model, ids, nt.TweakConfig(lr=1e-3, kl_norms="all", kl_lr=1e-2, rollback=False),
                   progress=False)
    assert rep.kl_tweak["loss_after"] == pytest.approx(heldout_kl(ref, model, ids), rel=1e-4)
    assert rep.kl_tweak["loss_after"] < rep.kl_tweak["loss_before"]
    w = final_norm(model).module.weight.detach().clone()
    rep2 = nt.tweak(ref, model, ids, nt.TweakConfig(lr_grid=(50.0,), holdout=0.25, rollback=False, kl_norms="final",
                                                    kl_lr=50.0), progress=False)
    assert rep2.lr_search["lr"] is None and rep2.kl_tweak is None
    assert torch.equal(final_norm(model).module.weight, w)


def test_block_inputs_drop_any_key_value_cache():
    """A cache reaches the blocks under a name no adapter lists: capture_block_inputs drops it by type, and the
    blocks then run on the captured kwargs alone."""
    from transformers.cache_utils import DynamicCache

    from normtweak.pipeline import capture_block_inputs

    model = tiny("llama")
    first = blocks(model)[0]
    h = first.register_forward_pre_hook(lambda m, a, kw: (a, {**kw, "kv_store": DynamicCache()}), with_kwargs=True)
    try:
        inputs, kwargs = capture_block_inputs(model, calib(n=2))
    finally:
        h.remove()
    assert "kv_store" not in kwargs and len(inputs) == 2
    assert not any(k in kwargs for k in ("past_key_values", "past_key_value", "cache", "layer_past"))
    with torch.no_grad():
        first(inputs[0], **kwargs)


def test_bench_page_keeps_the_measurement_date_and_links_its_sections(tmp_path):
    """Rendering again (--render-only) keeps the date the rows were stored, and the main table links the sections
    that follow it by the anchors GitHub gives their headings."""
    import json

    bench = load_bench()
    settings = {"lambada_limit": None, "ppl_windows": 1, "mc_limit": None, "calib": "generate", "calib_seed": 0,
                "nsamples": 2, "seqlen": 8, "tweak_lr": 1e-5, "tweak_scale": 5.0, "sym": False, "act_order": True,
                "mc_tasks": ""}
    row = {"lambada_acc": 0.5, "lambada_ppl": 2.0, "lambada_n": 2, "ppl": 3.0, "quantize_s": 0.0, "peak_rss_gib": 1.0}
    main, other = tmp_path / "results.json", tmp_path / "results_smoothquant.json"
    bench.update_store({"settings": settings, "rows": {}}, main, "float", row)
    stored = json.loads(main.read_text())
    assert stored["written"] == str(bench.datetime.date.today())
    stored["written"] = "2000-01-02"
    other.write_text(json.dumps(stored))
    text = bench.page(stored, main, ["float"], [str(other)])
    assert text.count("Written 2000-01-02") == 2
    title = bench.ALSO_STORES["results_smoothquant.json"]
    assert f"## {title}" in text and f"(#{bench.anchor(title)})" in text
    assert bench.anchor(title) == "smoothquant-weight-and-activation-quantization"
    # Rows on calibration drawn before each sample had its own generator are not this normtweak's draw: they are
    # not counted as measured (a run measures them again), and the page says how they were drawn.
    from normtweak.calibration import SAMPLER

    assert bench.stored_rows(main, settings) == {} and "one random stream across batches of 8" in text
    bench.update_store({"settings": settings, "rows": {}, "calib_sampler": SAMPLER}, main, "float", row)
    assert list(bench.stored_rows(main, settings)) == ["float"]
    now = bench.page(json.loads(main.read_text()), main, ["float"], [])
    assert "Calibration: generated by the model (seed 0), 2 x 8 tokens" in now


def test_bench_pairs_only_rows_from_one_calibration_sampler(tmp_path):
    """--pair and --pair-draws compare passage by passage, so both rows of a pair must come from one calibration
    draw: a row file from before rows recorded their sampler (the old shared stream) does not pair with one from
    today's sampler, and the draws table says which draws are the old sampler's."""
    import json

    from normtweak.calibration import SAMPLER

    bench = load_bench()
    settings = {"calib": "generate", "calib_seed": 0, "nsamples": 2, "seqlen": 8}

    def row(name, correct, **extra):
        return {"row": name, "settings": settings, "lambada_acc": sum(correct) / 4, "lambada_ppl": 2.0,
                "lambada_n": 4, "lambada_correct": bench.bits_to_hex(correct), "quantize_s": 0.0, **extra}

    old = row("gptq", [True, False, False, False])
    new_base = row("gptq", [True, False, False, False], calib_sampler=SAMPLER)
    new_row = row("gptq-nt", [True, True, False, False], calib_sampler=SAMPLER)
    assert "+1/-0" in bench.pair_table([new_base, new_row])
    with pytest.raises(SystemExit, match="not pairable"):
        bench.pair_table([old, new_row])
    files = []
    for i, r in enumerate([new_base, new_row, old, {**new_row, "calib_sampler": bench.LEGACY_SAMPLER}]):
        files.append(tmp_path / f"{i}.json")
        files[-1].write_text(json.dumps(r))
    table = bench.draws_table([str(f) for f in files])
    assert table.count("old shared-stream sampler") == 1
    with pytest.raises(SystemExit, match="sampler"):
        bench.draws_table([str(files[2]), str(files[1])])
    # Text calibration has no sampler: a row file recording None and a store or file leaving the key out read alike.
    text = {**settings, "calib": "text:emma"}
    text_rows = [{**r, "settings": text} for r in (row("gptq", [True, False, False, False], calib_sampler=None),
                                                     row("gptq-nt", [True, True, False, False]))]
    assert [bench.stored_sampler(r) for r in text_rows] == [None, None]
    assert "+1/-0" in bench.pair_table(text_rows)
    assert bench.same_draw({"settings": text, "rows": {}}, text)
    assert not bench.same_draw({"settings": settings, "rows": {}}, settings)  # no sampler recorded: the old stream
    for i, r in enumerate(text_rows):
        files[i].write_text(json.dumps(r))
    assert "old shared-stream" not in bench.draws_table([str(f) for f in files[:2]])


def test_bench_extends_a_row_only_when_it_reproduces_and_imports_only_matching_rows(tmp_path):
    """--extend adds multiple-choice tasks to an earlier row only when this run has its settings (the
    multiple-choice tasks aside), its weights, its KL stage result and its text perplexity; the earlier LAMBADA
    results are kept. --import-rows puts only rows measured with the store's settings into a store (a float row:
    whatever the calibration)."""
    import argparse
    import json
    from pathlib import Path

    from normtweak.calibration import SAMPLER

    bench = load_bench()
    settings = {"calib": "generate", "calib_seed": 0, "nsamples": 2, "seqlen": 8, "mc_tasks": ""}
    earlier = {"row": "gptq-nt", "settings": settings, "calib_sampler": SAMPLER, "linear_sha": "ab", "ppl": 50.0,
               "kl_tweak": {"loss_after": 0.3}, "lambada_acc": 0.25, "lambada_correct": "1"}
    now = {"row": "gptq-nt", "settings": {**settings, "mc_tasks": "piqa"}, "calib_sampler": SAMPLER,
           "linear_sha": "ab", "kl_tweak": {"loss_after": 0.3}}
    bench.check_extendable(earlier, now)
    bench.check_reproduced(earlier, now, 50.0)
    for bad, match in (({**now, "linear_sha": "cd"}, "Linear weights differ"),
                       ({**now, "settings": {**now["settings"], "nsamples": 4}}, "nsamples"),
                       ({**now, "calib_sampler": bench.LEGACY_SAMPLER}, "sampler")):
        with pytest.raises(SystemExit, match=match):
            bench.check_extendable(earlier, bad)
    with pytest.raises(SystemExit, match="text ppl"):
        bench.check_reproduced(earlier, now, 50.0 * (1 + 1e-6))
    with pytest.raises(SystemExit, match="KL stage"):
        bench.check_reproduced(earlier, {**now, "kl_tweak": {"loss_after": 0.31}}, 50.0)
    float_row = {"row": "float", "settings": {**settings, "nsamples": 128}, "ppl": 37.0}
    bench.check_extendable(float_row, {**float_row, "settings": now["settings"], "linear_sha": "ff"})

    asked = []
    args = argparse.Namespace(mc_tasks="piqa")
    out = bench.extend_row(earlier, now, args, lambda t: asked.append(t) or {"acc": 0.6, "acc_norm": 0.7, "n": 3})
    assert asked == ["piqa"] and out["piqa"] == 0.6 and out["piqa_n"] == 3
    assert out["lambada_correct"] == "1" and out["settings"]["mc_tasks"] == "piqa"
    assert bench.extend_row(out, now, args, lambda t: pytest.fail("piqa is there"))["extended"]["tasks"] == []

    store = {"settings": {**settings, "mc_tasks": "piqa"}, "calib_sampler": SAMPLER, "rows": {}}
    files = []
    for i, r in enumerate([out, {**float_row, "settings": store["settings"] | {"nsamples": 128}}]):
        files.append(str(tmp_path / f"{i}.json"))
        Path(files[-1]).write_text(json.dumps(r))
    bench.import_rows(store, files)
    assert set(store["rows"]) == {"gptq-nt", "float"} and store["rows"]["gptq-nt"]["piqa"] == 0.6
    Path(files[0]).write_text(json.dumps(earlier))  # mc_tasks "" against the store's "piqa"
    with pytest.raises(SystemExit, match="mc_tasks"):
        bench.import_rows(store, files[:1])
    # The page says which columns were measured later, by --extend.
    full = {"lambada_limit": None, "ppl_windows": 1, "mc_limit": None, "tweak_lr": 1e-5, "tweak_scale": 5.0,
            "sym": False, "act_order": True, **store["settings"]}
    cells = {"lambada_acc": 0.5, "lambada_ppl": 2.0, "lambada_n": 1, "ppl": 3.0, "piqa": 0.6, "quantize_s": 0.0,
             "peak_rss_gib": 1.0}
    rows = {"gptq-w3g128": {**cells, "extended": {"tasks": ["piqa"]}}, "float": {**cells, "extended": {"tasks": []}}}
    text = bench.render({**store, "settings": full, "rows": rows}, tmp_path / "s.json", [])
    assert "piqa of `gptq-w3g128` were measured later" in text and "`float`" not in text


@pytest.mark.parametrize("tokens", [1, 64])
@pytest.mark.parametrize("arch", ARCHS)
def test_watched_inputs_stop_the_forward_once_every_watched_layer_has_run(arch, tokens, monkeypatch):
    """Statistics gathering hands every watcher exactly the inputs a full forward of each sample gives its layer,
    one sample at a time, whether the samples run alone (tokens 1) or two to a batch (64 tokens: 32 + 32, then
    the third alone); from the second forward on, the forward stops once the last watched layer has its input, so
    later layers do not run."""
    from normtweak.pipeline import capture_block_inputs
    from normtweak.tweak import run_watching_inputs

    monkeypatch.setattr(TWEAK, "FORWARD_TOKENS", tokens)
    model = tiny(arch)
    inputs, kwargs = capture_block_inputs(model, calib(n=3))
    block, groups = blocks(model)[0], get_adapter(model).groups
    every = [n for g in groups for n in g]
    full: dict = {n: [] for n in every}
    hooks = [block.get_submodule(n).register_forward_pre_hook(lambda m, a, _n=n: full[_n].append(a[0].clone()))
             for n in every]
    with torch.no_grad():
        for x in inputs:
            block(x, **kwargs)
    for h in hooks:
        h.remove()
    last = every[-1]
    for group in groups:
        seen: dict = {n: [] for n in group}
        ran = []
        h = block.get_submodule(last).register_forward_hook(lambda *a: ran.append(1))
        run_watching_inputs(block, {n: (lambda x, _n=n: seen[_n].append(x.clone())) for n in group}, inputs, kwargs)
        h.remove()
        for n in group:
            assert len(seen[n]) == len(inputs)
            assert all(torch.equal(a, b) for a, b in zip(seen[n], full[n]))
        assert len(ran) == 1, f"{last} ran {len(ran)} times over {len(inputs)} samples watching {group}"


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_block_forwards_give_each_sample_its_own_output_to_the_bit(arch):
    """run_block batches consecutive samples (up to FORWARD_TOKENS tokens) where the block's keyword arguments
    broadcast over a batch; each output equals the sample's own forward exactly, so batching changes no result.
    BLOOM's ALiBi tensor carries the batch in its first dimension: its samples run one at a time."""
    from normtweak.pipeline import capture_block_inputs
    from normtweak.tweak import forward_batches, run_block

    model = tiny(arch)
    inputs, kwargs = capture_block_inputs(model, calib(n=5))
    block = blocks(model)[0]
    with torch.no_grad():
        alone = [_first(block(x, **kwargs)) for x in inputs]
    runs = [len(xs) for xs in forward_batches(inputs, kwargs)]
    assert sum(runs) == len(inputs)
    assert runs == ([1] * 5 if arch == "bloom" else [5])
    assert [len(xs) for xs in forward_batches(inputs, kwargs, tokens=64)] == ([1] * 5 if arch == "bloom"
                                                                              else [2, 2, 1])
    for a, b in zip(alone, run_block(block, inputs, kwargs), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_quantize_and_tweak_are_the_same_with_and_without_batched_forwards(arch, monkeypatch):
    """The whole walk (Hessians, GPTQ, the tweak and its judge) ends in the same weights and norms to the bit
    whether the block forwards batch samples or not (OPT flattens its MLP's input to [tokens, C])."""
    results, batches = [], []
    for tokens in (1, TWEAK.FORWARD_TOKENS):
        monkeypatch.setattr(TWEAK, "FORWARD_TOKENS", tokens)
        model = tiny(arch)
        seen = []
        hook = blocks(model)[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
        report = nt.pipeline.quantize(model, calib(), nt.GPTQConfig(bits=3, group_size=32),
                                      nt.TweakConfig(lr=1e-3, kl_norms="all"), progress=False)
        hook.remove()
        results.append((model.state_dict(), report))
        batches.append(max(seen))
    assert batches == [1, len(calib())]  # one sample per forward, then all 8 (256 tokens) in one
    (a, ra), (b, rb) = results
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [x["tweak"] for x in ra.blocks] == [x["tweak"] for x in rb.blocks]
    assert ra.kl_tweak == rb.kl_tweak


STATS_REL = 1e-9  # float64 sums of float32 tokens against the all-float64 reference


def channel_stats_gap_reference(f, q):
    """Figure 1's quantities straight from their definition, every token in float64."""
    F = torch.cat([x.reshape(-1, x.shape[-1]) for x in f]).double()
    Q = torch.cat([x.reshape(-1, x.shape[-1]) for x in q]).double()
    return ((F.mean(0) - Q.mean(0)).abs().mean().item(),
            (F.var(0, unbiased=False) - Q.var(0, unbiased=False)).abs().mean().item())


def test_channel_moments_match_the_float64_reference_with_a_massive_activation():
    """A first token 1e4 times the rest in a few channels (an attention sink) and channels whose mean dwarfs their
    spread: the float64-accumulated moments keep the reference's digits."""
    from normtweak.pipeline import channel_moments, stats_gap

    g = torch.Generator().manual_seed(0)
    f = [torch.randn(1, 64, 48, generator=g) * 0.01 + 300.0 for _ in range(5)]
    q = [x + 1e-3 * torch.randn(x.shape, generator=g) for x in f]
    for x in f + q:
        x[0, 0, :3] = 3e6
    want = channel_stats_gap_reference(f, q)
    got = stats_gap(channel_moments(f), channel_moments(q))
    assert got == pytest.approx(want, rel=STATS_REL)
    mean, var = channel_moments(f)
    F = torch.cat([x.reshape(-1, 48) for x in f]).double()
    torch.testing.assert_close(mean, F.mean(0), rtol=STATS_REL, atol=0)
    torch.testing.assert_close(var, F.var(0, unbiased=False), rtol=STATS_REL, atol=0)


def test_model_fingerprint_names_the_weights_not_the_folder(tmp_path):
    """Cache keys (calibration, bench weights, block checkpoints) follow the model: the same weights loaded from
    two folders share a fingerprint, while a changed embedding row or config value gives a new one."""
    from normtweak.models import model_fingerprint

    model = tiny("llama")
    for name in ("a", "b"):
        model.save_pretrained(tmp_path / name)
    a, b = (tf.AutoModelForCausalLM.from_pretrained(tmp_path / n) for n in ("a", "b"))
    assert a.config._name_or_path != b.config._name_or_path
    assert model_fingerprint(a) == model_fingerprint(b) == model_fingerprint(model)
    with torch.no_grad():
        b.get_input_embeddings().weight[0, 0] += 1.0
    assert model_fingerprint(b) != model_fingerprint(a)
    a.config.rms_norm_eps *= 2
    assert model_fingerprint(a) != model_fingerprint(model)


def test_quantize_without_stats_skips_the_float_forward_and_keeps_the_weights():
    """block_stats=False without a tweak: the same quantized weights, one forward of each block over the samples fewer
    (the float block's, which only Figure 1's gaps need), and those gaps NaN rather than made up."""
    import math

    ids, results = calib(), {}
    for stats in (True, False):
        model = tiny("llama")
        seen = []
        hook = blocks(model)[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
        report = nt.pipeline.quantize(model, ids, nt.GPTQConfig(bits=3, group_size=32), progress=False,
                                      block_stats=stats)
        hook.remove()
        results[stats] = (model.state_dict(), report, sum(seen))
    (a, with_stats, runs), (b, without, runs_without) = results[True], results[False]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert runs - runs_without == len(ids)
    assert all(math.isfinite(x["delta_mu_before_tweak"]) for x in with_stats.blocks)
    assert all(math.isnan(x[k]) for x in without.blocks
               for k in ("delta_mu", "delta_var", "delta_mu_before_tweak", "delta_var_before_tweak"))
