"""The CUDA path from Python: CUDA tensors cross by DLPack and run on PyTorch's
current stream, with the CPU path's results. These need a GPU and the module
built with the back-end (CMAKE_ARGS=-DNORMTWEAK_PYTHON_CUDA=ON); the machine
that runs CI has neither, so they are skipped there with that reason. The
kernels' arithmetic is tested on the CPU by tests/cpp/test_cuda_host.cpp."""

import pytest
import torch
from conftest import realistic_activations, realistic_weights

import normtweak as nt
from normtweak import _core
from normtweak.tweak import channel_dist_loss

needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and _core.has_cuda()),
    reason="needs a CUDA GPU and normtweak._core built with NORMTWEAK_PYTHON_CUDA=ON",
)


@needs_gpu
def test_gptq_and_rtn_on_cuda_match_the_cpu():
    W = realistic_weights(128, 256, seed=1)
    X = realistic_activations(2048, 256, seed=2)
    acc = nt.HessianAccumulator(256)
    acc.add_batch(X)
    H = acc.hessian()
    ref = nt.gptq_quantize(W, H, bits=3, group_size=64, sym=False, act_order=True)
    gpu = nt.gptq_quantize(W.cuda(), H.cuda(), bits=3, group_size=64, sym=False, act_order=True)
    assert (gpu.codes.cpu() != ref.codes).float().mean().item() <= 1e-2  # tol::cuda_gptq_code_mismatch
    assert abs(gpu.loss - ref.loss) <= 5e-3 * ref.loss  # tol::cuda_gptq_loss_rel
    assert torch.equal(nt.rtn_quantize(W.cuda(), bits=4, group_size=64).codes.cpu(), nt.rtn_quantize(W, bits=4, group_size=64).codes)


@needs_gpu
def test_loss_and_norm_backward_on_cuda_match_the_cpu():
    f = realistic_activations(256, 96, seed=3)
    q = (f + 0.05 * realistic_activations(256, 96, seed=4)).requires_grad_()
    qc = q.detach().cuda().requires_grad_()
    for kind in ("dist", "reldist", "mse", "kl"):
        lc = channel_dist_loss(q, f, kind)
        lg = channel_dist_loss(qc, f.cuda(), kind)
        (gc,) = torch.autograd.grad(lc, q)
        (gg,) = torch.autograd.grad(lg, qc)
        assert abs(lg.item() - lc.item()) <= 1e-6 * abs(lc.item())
        torch.testing.assert_close(gg.cpu(), gc, rtol=1e-5, atol=1e-8)
