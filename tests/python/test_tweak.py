"""Norm Tweaking pieces through the bindings, against torch.autograd and torch.optim."""

import dataclasses
import importlib

import pytest
import torch
from conftest import realistic_activations

import normtweak as nt
from normtweak import _core
from normtweak.tweak import NormFn, _first, kl_steps

TWEAK = importlib.import_module("normtweak.tweak")  # the module: nt.tweak is the post-step function

# float32 C++ vs float64 torch autograd of the same formulas.
FWD_REL = 1e-5
GRAD_REL = 1e-4


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def dist_loss_torch(q, f, relative=False):
    mu_f, mu_q = f.mean(0), q.mean(0)
    var_f, var_q = f.var(0, unbiased=False), q.var(0, unbiased=False)
    v = var_f + _core.RELDIST_VAR_FLOOR if relative else torch.ones_like(var_f)
    return ((mu_f - mu_q).abs() / v.sqrt() + (var_f - var_q).abs() / v).mean()


@pytest.mark.parametrize("kind", ["dist", "reldist", "mse", "kl"])
def test_channel_dist_loss_matches_autograd(kind):
    f = realistic_activations(256, 48, seed=1) * 0.1
    q = f + 0.05 * torch.randn(f.shape, generator=torch.Generator().manual_seed(2)) + 0.01
    qd = q.double().requires_grad_()
    if kind in ("dist", "reldist"):
        ref = dist_loss_torch(qd, f.double(), relative=kind == "reldist")
    elif kind == "mse":
        ref = ((qd - f.double()) ** 2).mean()
    else:
        ref = torch.nn.functional.kl_div(
            torch.log_softmax(qd, -1), torch.log_softmax(f.double(), -1), log_target=True, reduction="batchmean"
        )
    ref.backward()
    qq = q.clone().requires_grad_()
    loss = nt.channel_dist_loss(qq, f, kind)
    (2.0 * loss).backward()
    assert abs(loss.item() - ref.item()) / ref.item() < FWD_REL
    assert rel(qq.grad, 2.0 * qd.grad) < GRAD_REL


@pytest.mark.parametrize("kind,bias,offset", [("rms", False, False), ("rms", False, True), ("layer", True, False)])
def test_norm_backward_matches_autograd(kind, bias, offset):
    x = realistic_activations(64, 40, seed=3).reshape(4, 16, 40)
    g = torch.Generator().manual_seed(4)
    w = (1 + 0.2 * torch.randn(40, generator=g)).requires_grad_()
    b = (0.1 * torch.randn(40, generator=g)).requires_grad_() if bias else None
    dy = torch.randn(4, 16, 40, generator=g)

    xd = x.double().requires_grad_()
    wd = w.detach().double().requires_grad_()
    bd = b.detach().double().requires_grad_() if bias else None
    mu = xd.mean(-1, keepdim=True) if kind == "layer" else 0
    d = xd - mu
    yd = d * torch.rsqrt((d * d).mean(-1, keepdim=True) + 1e-5) * (wd + (1 if offset else 0))
    if bias:
        yd = yd + bd
    (yd * dy.double()).sum().backward()

    xx = x.clone().requires_grad_()
    y = NormFn.apply(xx, w, b, kind, 1e-5, offset)
    (y * dy).sum().backward()
    assert rel(y, yd) < FWD_REL
    assert rel(xx.grad, xd.grad) < GRAD_REL
    assert rel(w.grad, wd.grad) < GRAD_REL
    if bias:
        assert rel(b.grad, bd.grad) < GRAD_REL


def test_norm_tweaker_is_torch_adam_with_the_layer_schedule():
    p = torch.tensor([1.0, -2.0, 0.5])
    ref = p.clone().requires_grad_()
    tw = _core.NormTweaker(1e-3, 5.0, 1, 30)
    lr = tw.lr(6)
    assert lr == pytest.approx(1e-3 * (1 + 5.0 * 6 / 30))
    opt = torch.optim.Adam([ref], lr=lr)
    tw.begin_layer(6, [p])
    for s in range(1, 4):
        grad = torch.tensor([0.1 * s, -0.3, 2.0 / s])
        tw.step([grad])
        ref.grad = grad.clone()
        opt.step()
    assert torch.allclose(p, ref.detach(), rtol=1e-6, atol=1e-7)
    assert tw.steps == 3


def test_tweak_config_validation():
    with pytest.raises(ValueError, match="tweak lr=0"):
        nt.TweakConfig(lr=0)
    with pytest.raises(ValueError, match="loss='l1'"):
        nt.TweakConfig(loss="l1")
    f = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="loss='l1' is not one of dist, mse, kl, reldist"):
        _core.channel_dist_loss(f, f, "l1")
    with pytest.raises(ValueError, match="passes=-1 must be non-negative"):
        nt.TweakConfig(passes=-1, kl_norms="all")
    with pytest.raises(ValueError, match="passes=0 skips the per-block tweak.*--kl-tweak"):
        nt.TweakConfig(passes=0)
    with pytest.raises(ValueError, match=r"lr_grid=\[1e-05\].*passes=0 skips"):
        nt.TweakConfig(passes=0, kl_norms="all", lr_grid=(1e-5,))
    assert nt.TweakConfig(passes=0, kl_norms="final").passes == 0


def one_llama_block(samples: int):
    """A random one-block LLaMA: (block, its norms, `samples` inputs [1, 8, 32], block kwargs, targets the norms
    can move toward)."""
    import transformers as tf

    from normtweak.models import block_norms, get_adapter

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, num_hidden_layers=1, hidden_size=32, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    block = model.model.layers[0]
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, 8, 32, generator=g) for _ in range(samples)]
    pos = model.model.rotary_emb(xs[0], torch.arange(8)[None])
    kw = {"position_embeddings": pos, "attention_mask": None}
    with torch.no_grad():
        fs = [1.1 * block(x, **kw) + 0.05 for x in xs]
    return block, block_norms(block, get_adapter(model)), xs, kw, fs


def test_holdout_samples_judge_the_tweak_and_are_not_trained_on():
    block, norms, xs, kw, fs = one_llama_block(8)
    r = nt.tweak_block(block, norms, xs, fs, kw, nt.TweakConfig(lr=1e-2, holdout=0.25), 0, 1)
    assert r["steps"] == 6  # 8 samples, 2 held out
    assert r["loss_after"] <= r["loss_before"]
    with pytest.raises(ValueError, match="holdout=1.0"):
        nt.TweakConfig(holdout=1.0)


def test_the_judge_reuses_the_callers_outputs_and_hands_back_its_own():
    """Given the block's outputs before the tweak, the judge starts from them (the same loss as running the block
    again); with every sample judging, the result carries the block's outputs as left, tweaked or rolled back."""
    block, norms, xs, kw, fs = one_llama_block(6)
    params = [p for n in norms for p in n.params]
    start = [p.detach().clone() for p in params]

    def outputs():
        with torch.no_grad():
            return [_first(block(x, **kw)) for x in xs]

    def reset():
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)

    q0 = outputs()
    runs = {}
    for how, given in (("computed", None), ("given", q0)):
        reset()
        runs[how] = nt.tweak_block(block, norms, xs, fs, kw, nt.TweakConfig(lr=1e-2), 0, 1, outputs=given)
    assert runs["computed"]["loss_before"] == runs["given"]["loss_before"]
    assert runs["computed"]["loss_after"] == runs["given"]["loss_after"] < runs["computed"]["loss_before"]
    now = outputs()  # the tweaked block
    assert not runs["given"]["rolled_back"] and all(torch.equal(a, b) for a, b in zip(runs["given"]["outputs"], now))
    assert not torch.equal(now[0], q0[0])
    # Targets the block already meets: nothing can lower the loss, the norms are rolled back and the outputs
    # handed back are the ones from before.
    reset()
    r = nt.tweak_block(block, norms, xs, q0, kw, nt.TweakConfig(lr=1e-1), 0, 1, outputs=[q.clone() for q in q0])
    assert r["rolled_back"] and all(torch.equal(a, b) for a, b in zip(r["outputs"], q0))
    assert all(torch.equal(a, b) for a, b in zip(outputs(), q0))
    # Held-out samples judge alone: the judge starts from the caller's outputs of those samples (the last ones).
    reset()
    held = nt.tweak_block(block, norms, xs, fs, kw, nt.TweakConfig(lr=1e-2, holdout=0.5), 0, 1, outputs=q0)
    reset()
    held_computed = nt.tweak_block(block, norms, xs, fs, kw, nt.TweakConfig(lr=1e-2, holdout=0.5), 0, 1)
    assert "outputs" not in held and held["loss_before"] == held_computed["loss_before"]
    with pytest.raises(ValueError, match="got 5 outputs for 6 inputs"):
        nt.tweak_block(block, norms, xs, fs, kw, nt.TweakConfig(), 0, 1, outputs=q0[:5])


def test_skip_first_leaves_the_sink_token_out_of_the_loss():
    """skip_first=1: what the first position of the targets holds (here a massive activation, as an attention
    sink carries) changes nothing; without it the same change moves the loss and the tweaked norms."""
    block, norms, xs, kw, fs = one_llama_block(6)
    params = [p for n in norms for p in n.params]
    start = [p.detach().clone() for p in params]
    with torch.no_grad():
        q = [_first(block(x, **kw)) for x in xs]  # the untweaked block's outputs
    sink = [f.clone() for f in fs]
    for f in sink:
        f[:, 0, 3] = 1e3

    def run(targets, skip):
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
        r = nt.tweak_block(block, norms, xs, targets, kw, nt.TweakConfig(lr=1e-2, skip_first=skip, rollback=False),
                           0, 1)
        return r, [p.detach().clone() for p in params]

    (r_plain, w_plain), (r_sink, w_sink) = run(fs, 1), run(sink, 1)
    assert r_plain["loss_before"] == r_sink["loss_before"]
    assert all(torch.equal(a, b) for a, b in zip(w_plain, w_sink))
    # The loss it reports is eq. 2 over positions 1.. only (double-precision twin).
    want = sum(dist_loss_torch(qi[0, 1:].double(), fi[0, 1:].double()).item() for qi, fi in zip(q, fs)) / len(xs)
    assert r_plain["loss_before"] == pytest.approx(want, rel=FWD_REL)
    (r0_plain, w0_plain), (r0_sink, w0_sink) = run(fs, 0), run(sink, 0)
    assert r0_sink["loss_before"] > 10 * r0_plain["loss_before"]
    assert any(not torch.equal(a, b) for a, b in zip(w0_plain, w0_sink))
    with pytest.raises(ValueError, match="skip_first=8 leaves no token"):
        nt.tweak_block(block, norms, xs, fs, kw, nt.TweakConfig(skip_first=8), 0, 1)
    with pytest.raises(ValueError, match="skip_first=-1"):
        nt.TweakConfig(skip_first=-1)


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_kl_tweak_gradient_matches_a_double_precision_twin(kind):
    """The KL tweak's gradient (C++ norm backward under torch's next-token KL through a frozen head)
    against the same formulas in float64 autograd."""
    from normtweak.tweak import next_token_kl

    g = torch.Generator().manual_seed(3)
    C, V = 48, 96
    x = realistic_activations(64, C, seed=4).reshape(2, 32, C)
    head = torch.randn(V, C, generator=g) / C**0.5
    w = (1 + 0.2 * torch.randn(C, generator=g)).requires_grad_(True)
    b = (0.1 * torch.randn(C, generator=g)).requires_grad_(True) if kind == "layer" else None
    target = torch.randn(2, 32, V, generator=g) * 3
    loss = next_token_kl(NormFn.apply(x, w, b, kind, 1e-6, False) @ head.T, target)
    loss.backward()

    xd, wd = x.double(), w.detach().double().requires_grad_(True)
    bd = b.detach().double().requires_grad_(True) if b is not None else None
    if kind == "rms":
        y = xd * (xd.pow(2).mean(-1, keepdim=True) + 1e-6).rsqrt() * wd
    else:
        mu = xd.mean(-1, keepdim=True)
        y = (xd - mu) * ((xd - mu).pow(2).mean(-1, keepdim=True) + 1e-6).rsqrt() * wd + bd
    lf = torch.log_softmax(target.double(), -1)
    lq = torch.log_softmax(y @ head.double().T, -1)
    want = (lf.exp() * (lf - lq)).sum(-1).mean()
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=FWD_REL)
    assert rel(w.grad, wd.grad) < GRAD_REL
    if b is not None:
        assert rel(b.grad, bd.grad) < GRAD_REL


@pytest.mark.parametrize("rows,vocab", [(66, 96), (21, 50_000)])
def test_sliced_next_token_kl_matches_the_whole_tensor_formula_in_double(rows, vocab, monkeypatch):
    """next_token_kl (slices of positions, its own backward) against the formula on whole float64 tensors under
    autograd, and against its float32 twin bit for bit: the loss and the gradient. At the small vocabulary a
    slice holds 8 positions, so the last of 66 is partial; at 50,000 tokens the default slice holds 20 of 21."""
    if vocab < 1000:
        monkeypatch.setattr(TWEAK, "KL_SLICE_BYTES", 8 * 4 * vocab)
    g = torch.Generator().manual_seed(11)
    shape = (rows // 3, 3, vocab) if rows % 3 == 0 else (rows, vocab)
    # a few large logits over a broad low tail, as a language model's are
    f = torch.randn(shape, generator=g) * 4 + 8 * (torch.rand(shape, generator=g) > 0.999)
    q = (f + torch.randn(shape, generator=g)).requires_grad_(True)
    loss = TWEAK.next_token_kl(q, f)
    loss.backward()
    qd = q.detach().double().requires_grad_(True)
    lf = torch.log_softmax(f.double(), -1)
    want = (lf.exp() * (lf - torch.log_softmax(qd, -1))).sum(-1).mean()
    want.backward()
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(want.item(), rel=FWD_REL)
    assert rel(q.grad, qd.grad) < GRAD_REL
    # the plain twin in float32: the same per-position operations, so the same bits (stored runs reproduce)
    q32 = q.detach().clone().requires_grad_(True)
    twin = TWEAK.next_token_kl_ref(q32, f)
    twin.backward()
    assert torch.equal(loss, twin) and torch.equal(q.grad, q32.grad)
    with pytest.raises(ValueError, match=r"quantized logits \(2, 3, 96\) and float logits \(2, 3, 95\)"):
        TWEAK.next_token_kl(torch.zeros(2, 3, 96), torch.zeros(2, 3, 95))


def test_kl_judge_measures_on_evenly_spread_samples_and_leaves_the_same_norms():
    """kl_judge=2 of 8 training samples: the reported KL is the mean over samples 0 and 4, before and after, and the
    trained norm is the one a judge on every sample leaves (the judge decides only the rollback)."""
    from normtweak.tweak import NormInfo, next_token_kl, tweak_norms_kl

    g = torch.Generator().manual_seed(8)
    C, V = 16, 40
    head = torch.nn.Linear(C, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, C, generator=g))
    fs = torch.randn(8, 12, C, generator=g)
    qs = fs * (1 + 0.3 * torch.rand(C, generator=g))
    results, weights = [], []
    for judge in (0, 2):
        qnorm = torch.nn.RMSNorm(C, eps=1e-6)
        seen: list[list[int]] = []

        def quant_logits(idx, _n=qnorm, _seen=seen):
            _seen.append(list(idx))
            return head(_n(qs[idx]))

        float_logits = lambda idx: head(fs[idx])  # noqa: E731
        norm = NormInfo("norm", qnorm, "rms", 1e-6)
        before = [next_token_kl(quant_logits([j]), float_logits([j])).item() for j in range(8)]
        seen.clear()
        r = tweak_norms_kl([norm], quant_logits, float_logits, 8, nt.TweakConfig(kl_lr=3e-2, kl_judge=judge),
                           frozen=head.parameters())
        calls = list(seen)
        with torch.no_grad():
            after = [next_token_kl(quant_logits([j]), float_logits([j])).item() for j in range(8)]
        results.append((r, before, after, calls))
        weights.append(qnorm.weight.detach().clone())
    (every, b0, a0, seen0), (two, b2, a2, seen2) = results
    assert every["judged"] == 8 and two["judged"] == 2 and not two["rolled_back"]
    assert every["loss_before"] == pytest.approx(sum(b0) / 8, rel=FWD_REL)
    assert every["loss_after"] == pytest.approx(sum(a0) / 8, rel=FWD_REL)
    assert two["loss_before"] == pytest.approx((b2[0] + b2[4]) / 2, rel=FWD_REL)
    assert two["loss_after"] == pytest.approx((a2[0] + a2[4]) / 2, rel=FWD_REL)
    # judged before and after, trained once; the rest trained only
    assert seen2 == [[0], [4]] + [[j] for j in range(8)] + [[0], [4]] and len(seen0) == 3 * 8
    assert torch.equal(weights[0], weights[1])
    with pytest.raises(ValueError, match="kl_judge=-1"):
        nt.TweakConfig(kl_judge=-1)


def test_kl_tweak_moves_the_quantized_distribution_toward_the_float_one():
    """A head fed by a perturbed hidden state: the KL tweak of the norm lowers the KL on held-out samples, leaves
    the head alone, and rolls back when the rate is absurd."""
    from normtweak.tweak import NormInfo, next_token_kl, tweak_norms_kl

    g = torch.Generator().manual_seed(5)
    C, V = 32, 80
    fnorm = torch.nn.RMSNorm(C, eps=1e-6)
    head = torch.nn.Linear(C, V, bias=False)
    with torch.no_grad():
        fnorm.weight.copy_(1 + 0.3 * torch.randn(C, generator=g))
        head.weight.copy_(torch.randn(V, C, generator=g))
    qnorm = torch.nn.RMSNorm(C, eps=1e-6)
    with torch.no_grad():
        qnorm.weight.copy_(fnorm.weight)
    scale = 1 + 0.3 * torch.rand(C, generator=g)  # the quantized model's channel-wise error
    fs = torch.randn(8, 16, C, generator=g)
    qs = fs * scale
    head_w = head.weight.detach().clone()
    float_logits = lambda idx: head(fnorm(fs[idx]))  # noqa: E731
    quant_logits = lambda idx: head(qnorm(qs[idx]))  # noqa: E731
    cfg = nt.TweakConfig(kl_lr=3e-2, kl_passes=5, holdout=0.25)
    norm = NormInfo("norm", qnorm, "rms", 1e-6)
    r = tweak_norms_kl([norm], quant_logits, float_logits, 8, cfg, frozen=head.parameters())
    assert r["steps"] == 5 * 6 == kl_steps(8, cfg) and not r["rolled_back"]
    assert kl_steps(8, dataclasses.replace(cfg, batch_size=4)) == 5 * 2
    assert r["loss_after"] < 0.5 * r["loss_before"]
    with torch.no_grad():  # the reported loss is the held-out samples' KL under the tweaked norm
        held = sum(next_token_kl(quant_logits([j]), float_logits([j])).item() for j in (6, 7)) / 2
    assert r["loss_after"] == pytest.approx(held, rel=FWD_REL)
    assert torch.equal(head.weight, head_w) and head.weight.requires_grad and head.weight.grad is None
    tweaked = qnorm.weight.detach().clone()
    bad = tweak_norms_kl([norm], quant_logits, float_logits, 8, nt.TweakConfig(kl_lr=50.0, holdout=0.25))
    assert bad["rolled_back"] and torch.equal(qnorm.weight, tweaked)
    # skip_first leaves the first positions' predictions out: a huge error there changes nothing.
    qs[:, 0] *= 100
    with torch.no_grad():
        qnorm.weight.copy_(tweaked)
    skipped = tweak_norms_kl([norm], quant_logits, float_logits, 8, nt.TweakConfig(kl_lr=3e-2, holdout=0.25,
                                                                                     skip_first=1))
    with torch.no_grad():
        want = sum(next_token_kl(quant_logits([j])[:, 1:], float_logits([j])[:, 1:]).item() for j in (6, 7)) / 2
    assert skipped["loss_after"] == pytest.approx(want, rel=FWD_REL)
    with pytest.raises(ValueError, match="skip_first=16 leaves no token"):
        tweak_norms_kl([norm], quant_logits, float_logits, 8, nt.TweakConfig(skip_first=16))
    with pytest.raises(ValueError, match="kl_norms='some'"):
        nt.TweakConfig(kl_norms="some")
    with pytest.raises(ValueError, match="kl_lr=0.0"):
        nt.TweakConfig(kl_lr=0.0)
    with pytest.raises(ValueError, match="kl_passes=0"):
        nt.TweakConfig(kl_passes=0)
