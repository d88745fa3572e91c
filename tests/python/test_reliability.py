"""Interruption and reproducibility: a `normtweak quantize` process killed
mid-run resumes from its last completed block and writes the same bytes as an
uninterrupted run; the same command twice writes identical files; a resume
under other settings is refused."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_llama_dir

LAYERS = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny6"), layers=LAYERS, hidden=128, intermediate=512)


def quantize_cmd(model_dir, out, *extra):
    return [sys.executable, "-m", "normtweak.cli", "--threads", "2", "quantize", "--model", str(model_dir), "--out",
            str(out), "--wbits", "3", "--group-size", "32", "--act-order", "--tweak", "--tweak-lr", "1e-3",
            "--calib", "text:emma", "--nsamples", "8", "--seqlen", "64", "--seed", "3", *extra]


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_bytes_twice_and_after_a_kill_and_resume(model_dir, tmp_path):
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    for d in (a, b):
        subprocess.run(quantize_cmd(model_dir, d), check=True, capture_output=True)
    ref = files(a)
    assert set(ref) >= {"config.json", "model.safetensors"} and files(b) == ref
    assert not (tmp_path / "a.tmp").exists()

    proc = subprocess.Popen(quantize_cmd(model_dir, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "out.tmp" / "resume"
    deadline = time.time() + 300
    while not (ckpt / "block_0001.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed; make the test model slower"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 2 <= len(list(ckpt.glob("block_*.pt"))) < LAYERS
    assert not out.exists()  # nothing that looks like a finished checkpoint
    assert not (tmp_path / "out.tmp" / "config.json").exists()

    other = quantize_cmd(model_dir, out, "--resume")
    other[other.index("--wbits") + 1] = "4"
    r = subprocess.run(other, capture_output=True, text=True)
    assert r.returncode == 2 and "other config" in r.stderr and "'bits': 4" in r.stderr

    r = subprocess.run(quantize_cmd(model_dir, out, "--resume"), check=True, capture_output=True, text=True)
    m = re.search(r"blocks 0\.\.(\d+) restored", r.stderr)
    assert m and 0 <= int(m.group(1)) < LAYERS - 1
    assert files(out) == ref
    assert not (tmp_path / "out.tmp").exists()


def test_stale_temporaries_of_dead_processes_are_swept(tmp_path):
    """A killed writer leaves `PATH.PID.tmp`; the next save at PATH removes it, a live writer's temporary stays."""
    import torch
    from normtweak.models import save_atomic

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its PID is free now (reuse within this test would only make the sweep skip it)
    target = tmp_path / "calib.pt"
    stale_file = tmp_path / f"calib.pt.{dead.pid}.tmp"
    stale_file.write_bytes(b"half a file")
    stale_dir = tmp_path / f"calib.pt.{2**22 + 1}.tmp"  # above Linux's PID_MAX_LIMIT (2^22): never running
    stale_dir.mkdir()
    (stale_dir / "x").write_text("x")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live_file = tmp_path / f"calib.pt.{live.pid}.tmp"
        live_file.write_bytes(b"being written")
        other = tmp_path / "calib.pt.notapid.tmp"
        other.write_bytes(b"not ours")
        mine = tmp_path / f"calib.pt.{os.getpid()}.tmp"  # this process's own leftover, here a folder
        mine.mkdir()
        save_atomic(torch.arange(3), target)
        assert not mine.exists()
        assert torch.equal(torch.load(target), torch.arange(3))
        assert not stale_dir.exists()
        assert live_file.exists() and other.exists()
        if stale_file.exists():  # only if the OS handed the dead PID to a new process meanwhile
            os.kill(dead.pid, 0)
    finally:
        live.kill()
        live.wait()
