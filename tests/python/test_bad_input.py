"""Bad input: each case must fail with a ValueError that names the offending value and the fix, before
anything is written; and the seed must not touch the caller's global RNG."""

import copy
import shutil

import pytest
import torch
from conftest import realistic_weights, tiny_llama_dir

import normtweak as nt
from normtweak.calibration import cached_calibration, generate_calibration
from normtweak.models import load_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def model_tok(folder):
    return load_model(str(folder))


def calib(n: int = 4, seqlen: int = 32) -> torch.Tensor:
    return torch.randint(0, 1000, (n, seqlen), generator=torch.Generator().manual_seed(0))


def broken_copy(folder, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(folder, dst)
    return dst


def test_model_folder_with_a_missing_or_truncated_weight_file(folder, tmp_path):
    missing = broken_copy(folder, tmp_path, "missing")
    (missing / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"could not be loaded .*weight files there: none.*missing or truncated"):
        load_model(str(missing))
    truncated = broken_copy(folder, tmp_path, "truncated")
    w = truncated / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"could not be loaded .*weight files there: model.safetensors"):
        load_model(str(truncated))


def test_a_file_that_is_not_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file\n" * 8)
    with pytest.raises(ValueError, match=r"model.gguf could not be read as a GGUF model"):
        load_model(str(fake))
    with pytest.raises(ValueError, match=r"GGUF file .*absent.gguf does not exist"):
        load_model(str(tmp_path / "absent.gguf"))


def test_group_size_larger_than_a_layer_names_the_layer(model_tok):
    model, tok = model_tok
    with pytest.raises(ValueError, match=r"group_size=1000 is larger than layer 'model.layers.0.self_attn.q_proj' "
                                         r"\(in_features=64\); use --group-size 64 or smaller"):
        nt.quantize(copy.deepcopy(model), tok, nt.GPTQConfig(bits=3, group_size=1000), calib=calib(), progress=False)
    for bad in (dict(bits=1), dict(bits=9), dict(group_size=0), dict(group_size=-2)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}={next(iter(bad.values()))}"):
            nt.GPTQConfig(**bad)


def test_non_finite_weights_and_activations_name_the_layer(model_tok):
    model, tok = model_tok
    broken = copy.deepcopy(model)
    broken.model.layers[1].mlp.down_proj.weight.data[3, 5] = float("inf")
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.down_proj' contains 1 NaN/Inf"):
        nt.quantize(broken, tok, nt.GPTQConfig(bits=3, group_size=32), calib=calib(), progress=False)
    broken = copy.deepcopy(model)
    ids = calib()
    broken.model.embed_tokens.weight.data[ids[0, 3]] = float("nan")
    with pytest.raises(ValueError, match=r"input of layer 'model.layers.0.self_attn.q_proj': .*NaN/Inf"):
        nt.quantize(broken, tok, nt.GPTQConfig(bits=3, group_size=32), calib=ids, progress=False)


def test_empty_or_too_short_calibration_file(model_tok, tmp_path):
    model, tok = model_tok
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(ValueError, match=r"calibration file .*empty.txt is empty"):
        cached_calibration(model, tok, str(empty), 4, 32)
    short = tmp_path / "short.txt"
    short.write_text("A short file.")
    with pytest.raises(ValueError, match=r"fewer than seqlen=32 \+ 1; use a longer file or a smaller --seqlen"):
        cached_calibration(model, tok, str(short), 4, 32)
    with pytest.raises(ValueError, match=r"calibration file .*absent.txt does not exist"):
        cached_calibration(model, tok, str(tmp_path / "absent.txt"), 4, 32)


def test_dlpack_dtype_rank_device_and_contiguity():
    W = realistic_weights(16, 64, seed=1)
    for dt in (torch.int8, torch.bool, torch.complex64):
        with pytest.raises(ValueError, match=r"unsupported DLPack dtype \(code=\d, bits=\d+\); use float32"):
            nt._core.rtn_quantize(torch.zeros(4, 64, dtype=dt))
    with pytest.raises(ValueError, match=r"W must have rank 2, got rank 3 \(shape \[2, 16, 64\]\)"):
        nt.gptq_quantize(torch.randn(2, 16, 64), torch.eye(64))
    with pytest.raises(ValueError, match=r"W could not be exported by DLPack: .*meta"):
        nt._core.rtn_quantize(torch.empty(16, 64, device="meta"))
    # Strided inputs are read as they are (no copy needed) ...
    ref = nt.rtn_quantize(W, bits=3, group_size=32)
    strided = nt.rtn_quantize(W.t().contiguous().t(), bits=3, group_size=32)
    assert torch.equal(ref.Q, strided.Q)
    # ... but buffers that are written or read as raw rows must be contiguous.
    x = torch.randn(64, 8).t()  # [8, 64] with strides (1, 8)
    y, rstd = torch.empty(8, 64), torch.empty(8)
    with pytest.raises(ValueError, match=r"x must be contiguous"):
        nt._core.norm_forward("rms", 1e-6, False, x, torch.ones(64), None, y, rstd, None)
    r = nt.rtn_quantize(W, bits=4, group_size=32)
    codes = r.codes.t().contiguous().t()
    with pytest.raises(ValueError, match=r"codes must be contiguous"):
        nt._core.pack_gptq(codes, r.scales, r.zeros, r.g_idx, 4)


def test_seed_leaves_the_global_rng_alone(model_tok):
    model, tok = model_tok
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = generate_calibration(model, tok, n=2, seqlen=16, seed=5, progress=False)
    nt.quantize(copy.deepcopy(model), tok, nt.GPTQConfig(bits=3, group_size=32), tweak=nt.TweakConfig(lr=1e-3),
                calib=calib(), progress=False)
    assert torch.equal(before, torch.get_rng_state())
    torch.manual_seed(999)  # a different global state gives the same calibration
    assert torch.equal(a, generate_calibration(model, tok, n=2, seqlen=16, seed=5, progress=False))
