"""The command line on a tiny LLaMA that uses SmolLM2's tokenizer."""

import json

import pytest
import torch

from conftest import tiny_llama_dir

from normtweak import cli


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny"))


def test_quantize_with_report_then_eval(tiny_model_dir, tmp_path, capsys):
    out, png, js = tmp_path / "q", tmp_path / "fig1.png", tmp_path / "r.json"
    rc = cli.main(["quantize", "--model", str(tiny_model_dir), "--out", str(out), "--wbits", "3", "--group-size",
                   "32", "--act-order", "--tweak", "--tweak-lr", "1e-3", "--calib", "text:emma", "--nsamples", "4",
                   "--seqlen", "32", "--report", str(png), "--kl-tweak", "final", "--kl-lr", "1e-2"])
    assert rc == 0
    summary = capsys.readouterr().out
    assert "mean |d mu| after" in summary and "RTN fallbacks" in summary and "KL tweak (final): next-token KL" in summary
    assert "nats on 4 samples" in summary
    # The tweaked final norm is what the checkpoint holds.
    from safetensors.torch import load_file

    norm0, norm1 = (load_file(str(d / "model.safetensors"))["model.norm.weight"] for d in (tiny_model_dir, out))
    assert "(rolled back)" in summary or not torch.equal(norm0, norm1)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["bits"] == 3 and cfg["quantization_config"]["desc_act"] is True
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["eval", "--model", str(out), "--tasks", "ppl:persuasion", "--limit", "2", "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert res["ppl:persuasion"]["n"] == 2 * 511 and res["ppl:persuasion"]["ppl"] > 1


def test_clip_search_only_shrinks_the_ranges(tiny_model_dir, tmp_path):
    """--clip-search reaches the quantizer: RTN keeps the same groups, and each group's range can only shrink
    (the search starts at the full [min, max]), so every scale is <= the plain one and some are smaller."""
    from safetensors.torch import load_file

    scales = {}
    for flag in ([], ["--clip-search"]):
        out = tmp_path / ("clip" if flag else "plain")
        rc = cli.main(["quantize", "--model", str(tiny_model_dir), "--out", str(out), "--method", "rtn", "--wbits",
                       "2", "--group-size", "32", "--asym", "--calib", "text:emma", "--nsamples", "2", "--seqlen",
                       "16", "--no-checkpoint"] + flag)
        assert rc == 0
        sd = load_file(str(out / "model.safetensors"))
        scales[bool(flag)] = {k: v.float() for k, v in sd.items() if k.endswith(".scales")}
    # Scales are stored as float16 (relative spacing 2^-10 ~ 1e-3): equal scales may round one step apart.
    fp16_step = 2.0**-10
    assert scales[True].keys() == scales[False].keys() and scales[True]
    for k, plain in scales[False].items():
        assert (scales[True][k] <= plain * (1 + fp16_step)).all(), k
    assert any((scales[True][k] < scales[False][k] * (1 - fp16_step)).any() for k in scales[False])


def test_cli_errors_are_one_line(tiny_model_dir, tmp_path, capsys):
    rc = cli.main(["quantize", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "not a bundled name" in capsys.readouterr().err
    rc = cli.main(["quantize", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--wbits", "9",
                   "--calib", "text:emma", "--nsamples", "2", "--seqlen", "16"])
    assert rc == 2
    assert "bits=9" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_multiple_choice_scoring_is_batch_independent(tiny_model_dir):
    from normtweak import eval as ev
    from normtweak.models import load_model

    model, tok = load_model(str(tiny_model_dir))
    reqs = [(tok("Question: why?\nAnswer:").input_ids + tok(" " + w).input_ids, len(tok(" " + w).input_ids))
            for w in ("because it rains", "no", "the quick brown fox jumps")]
    a = ev.loglikelihoods(model, tok, reqs, batch_size=1)
    b = ev.loglikelihoods(model, tok, reqs, batch_size=3)
    assert a == pytest.approx(b, rel=1e-5)
    t, k = reqs[2]  # direct: sum of log p(token | prefix) over the continuation
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([t])).logits[0].float(), -1)
    direct = sum(logp[i - 1, t[i]].item() for i in range(len(t) - k, len(t)))
    assert a[2] == pytest.approx(direct, rel=1e-4)
    for task in ev.MC_TASKS:
        r = ev.multiple_choice(model, tok, task, limit=3, progress=False)
        assert r["n"] == 3 and 0 <= r["acc"] <= 1 and 0 <= r["acc_norm"] <= 1


def test_multiple_choice_prompts_follow_lm_eval_harness():
    from normtweak import eval as ev

    pairs, gold = ev._mc_items("winogrande", {"sentence": "Sarah was a better surgeon than Maria so _ got the easy cases.",
                                              "option1": "Sarah", "option2": "Maria", "answer": "2"})
    assert pairs == [("Sarah was a better surgeon than Maria so Sarah", " got the easy cases."),
                     ("Sarah was a better surgeon than Maria so Maria", " got the easy cases.")]
    assert gold == 1
    pairs, gold = ev._mc_items("boolq", {"passage": "P.", "question": "is it", "answer": False})
    assert pairs == [("P.\nQuestion: is it?\nAnswer:", " no"), ("P.\nQuestion: is it?\nAnswer:", " yes")] and gold == 0
    pairs, gold = ev._mc_items("hellaswag", {"activity_label": "Roof", "ctx_a": "A man sits.", "ctx_b": "he",
                                             "endings": ["pulls [title] up tiles.", "x  y"], "label": "1"})
    assert pairs[0] == ("Roof: A man sits. He", " pulls. up tiles.") and pairs[1][1] == " x y" and gold == 1
    for task in ev.MC_TASKS:
        rows = ev._mc_rows(task, 5)
        for row in rows:
            pairs, gold = ev._mc_items(task, row)
            assert len(pairs) >= 2 and 0 <= gold < len(pairs)
            assert all(cont.startswith(" ") and len(cont) > 1 for _, cont in pairs)


def test_generated_calibration_is_seeded_and_cached(tiny_model_dir, tmp_path, monkeypatch):
    from normtweak.calibration import cached_calibration, generate_calibration, language_token_ids
    from normtweak.models import load_model

    monkeypatch.setenv("NORMTWEAK_CACHE", str(tmp_path))
    model, tok = load_model(str(tiny_model_dir))
    a = generate_calibration(model, tok, n=3, seqlen=6, seed=5, progress=False)
    assert a.shape == (3, 6)
    assert torch.equal(a, generate_calibration(model, tok, n=3, seqlen=6, seed=5, progress=False))
    assert set(a[:, 0].tolist()) <= set(language_token_ids(tok))  # first tokens: words of the languages
    # sample i is drawn from its own generator: the same tokens whatever the batch size or the number of samples
    assert torch.equal(a[:2], generate_calibration(model, tok, n=2, seqlen=6, seed=5, batch_size=1, progress=False))
    assert torch.equal(a, generate_calibration(model, tok, n=3, seqlen=6, seed=5, batch_size=2, progress=False))
    other = generate_calibration(model, tok, n=3, seqlen=6, seed=6, progress=False)
    assert not torch.equal(a, other) and not torch.equal(a[1:], other[:2])
    with pytest.raises(ValueError, match="batch_size=0"):
        generate_calibration(model, tok, n=3, seqlen=6, batch_size=0, progress=False)
    b = cached_calibration(model, tok, "generate", n=3, seqlen=6, seed=5, progress=False)
    assert torch.equal(a, b)
    files = list((tmp_path / "calibration").glob("*.pt"))
    assert len(files) == 1 and "n3-len6-seed5" in files[0].name
    torch.save(torch.zeros(3, 6, dtype=torch.long), files[0])  # served from the cache, not regenerated
    assert cached_calibration(model, tok, "generate", n=3, seqlen=6, seed=5).sum() == 0
    c = cached_calibration(model, tok, "text:emma", n=2, seqlen=16, seed=0)
    assert c.shape == (2, 16)


def test_tweak_lr_option_takes_a_value_a_list_or_auto():
    from normtweak.search import DEFAULT_GRID

    assert cli._parse_lr("1e-4") == (1e-4, ())
    assert cli._parse_lr("1e-5,1e-4") == (1e-5, (1e-5, 1e-4))
    assert cli._parse_lr("auto") == (DEFAULT_GRID[0], DEFAULT_GRID)
    with pytest.raises(ValueError, match="'fast' is not a number"):
        cli._parse_lr("fast")
    args = cli.build_parser().parse_args(["quantize", "--model", "m", "--out", "o", "--tweak", "--tweak-order", "after"])
    assert cli._tweak_config(args).order == "after" and cli._tweak_config(args).target == "local"
    args = cli.build_parser().parse_args(["tweak", "--float", "f", "--quantized", "q", "--out", "o",
                                          "--tweak-target", "float"])
    assert cli._tweak_config(args).target == "float" and cli._tweak_config(args).kl_norms == "off"
    args = cli.build_parser().parse_args(["tweak", "--float", "f", "--quantized", "q", "--out", "o", "--kl-tweak",
                                          "all", "--kl-lr", "0.01", "--kl-passes", "3"])
    t = cli._tweak_config(args)
    assert t.kl_norms == "all" and t.kl_lr == 0.01 and t.kl_passes == 3
    args = cli.build_parser().parse_args(["tweak", "--float", "f", "--quantized", "q", "--out", "o",
                                          "--tweak-passes", "0", "--kl-tweak", "final"])
    assert cli._tweak_config(args).passes == 0
    args = cli.build_parser().parse_args(["tweak", "--float", "f", "--quantized", "q", "--out", "o",
                                          "--tweak-passes", "0"])
    with pytest.raises(ValueError, match="--tweak-passes 1 or more, or --kl-tweak"):
        cli._tweak_config(args)


def test_cli_smoothquant_w8a8_with_tweak(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "w8a8"
    common = ["quantize", "--model", str(tiny_model_dir), "--method", "smoothquant", "--wbits", "8", "--group-size",
              "-1", "--abits", "8", "--calib", "text:emma", "--nsamples", "4", "--seqlen", "32"]
    assert cli.main(common + ["--out", str(out)]) == 2  # activations cannot go into the GPTQ format
    assert "--format fake" in capsys.readouterr().err and not out.exists()
    assert cli.main(common + ["--out", str(out), "--format", "fake", "--alpha", "search", "--tweak"]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["activations"]["bits"] == 8 and qc["weights"]["method"] == "rtn"
    assert cli.main(["eval", "--model", str(out), "--tasks", "ppl:persuasion", "--limit", "1"]) == 0
    assert cli.main(common[:-8] + ["--abits", "8", "--alpha", "1.5", "--out", str(out)]) == 2
    assert "alpha=1.5" in capsys.readouterr().err
    static = tmp_path / "w8a8-static"
    assert cli.main(common + ["--out", str(static), "--format", "fake", "--act-static"]) == 0
    acts = json.loads((static / "config.json").read_text())["quantization_config"]["activations"]
    assert acts["scheme"] == "per-tensor static symmetric" and all(v > 0 for v in acts["scales"].values())


def test_lambada_accuracy_is_greedy_last_word_match(tiny_model_dir, monkeypatch):
    from normtweak import eval as ev
    from normtweak.models import load_model

    model, tok = load_model(str(tiny_model_dir))
    reqs = ev.lambada_requests(6)
    for i, (ctx, _) in enumerate(reqs[:4]):  # a random model gets real passages wrong: give some its own greedy word
        with torch.no_grad():
            g = model(input_ids=torch.tensor([tok(ctx, add_special_tokens=False).input_ids])).logits[0, -1].argmax()
        word = tok.decode([int(g)])
        if tok(word, add_special_tokens=False).input_ids == [int(g)]:
            reqs[i] = (ctx, word)
    monkeypatch.setattr(ev, "lambada_requests", lambda limit=None: reqs[:limit])
    r = ev.lambada(model, tok, limit=6, batch_size=4, progress=False, per_passage=True)
    assert r["n"] == 6 and len(r["correct"]) == 6
    assert 1 <= sum(r["correct"]) < 6
    nll, ntok = 0.0, 0
    for (ctx, cont), right in zip(reqs, r["correct"]):  # direct: one passage at a time
        c, w = tok(ctx, add_special_tokens=False).input_ids, tok(cont, add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([c + w])).logits[0, len(c) - 1 : -1].float()
        assert right == bool(torch.equal(logits.argmax(-1), torch.tensor(w)))
        nll -= torch.log_softmax(logits, -1).gather(1, torch.tensor(w)[:, None]).sum().item()
        ntok += len(w)
    assert r["acc"] == sum(r["correct"]) / 6
    assert r["ppl"] == pytest.approx(float(torch.exp(torch.tensor(nll / ntok))), rel=1e-4)


def test_paired_counts():
    from normtweak import eval as ev

    a = [True, True, False, False, True]
    b = [True, False, True, True, True]
    assert ev.paired_counts(a, b) == {"gained": 2, "lost": 1, "z": pytest.approx(1 / 3**0.5)}
    assert ev.paired_counts(a, a)["z"] == 0.0
    with pytest.raises(ValueError, match="same passages"):
        ev.paired_counts(a, b[:3])


def test_paired_over_draws():
    from normtweak import eval as ev

    # Two draws on 4 passages: per-passage mean differences d = [1, 0, -0.5, 0.5], mean 0.25 (1 passage of 4).
    a1, b1 = [False, True, True, False], [True, True, False, True]
    a2, b2 = [False, False, False, False], [True, False, False, False]
    r = ev.paired_over_draws([(a1, b1), (a2, b2)])
    var = (0.75**2 + 0.25**2 + 0.75**2 + 0.25**2) / 3
    assert r["draws"] == 2 and r["diff"] == pytest.approx(1.0)
    assert r["se"] == pytest.approx(4 * (var / 4) ** 0.5)
    assert r["z"] == pytest.approx(1.0 / r["se"])
    # One draw: McNemar's z up to the (gained - lost)^2 / n term and the n / (n - 1) of a sample variance.
    g = torch.Generator().manual_seed(0)
    a, b = (torch.rand(2000, generator=g) < 0.3).tolist(), (torch.rand(2000, generator=g) < 0.33).tolist()
    one, mc = ev.paired_over_draws([(a, b)]), ev.paired_counts(a, b)
    assert one["diff"] == pytest.approx(mc["gained"] - mc["lost"])
    assert one["z"] == pytest.approx(mc["z"], rel=0.01)
    with pytest.raises(ValueError, match="same passages"):
        ev.paired_over_draws([(a1, b1), (a2, b2[:3])])
