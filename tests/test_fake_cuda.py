"""GKGNet-S and Pyramid ViG-S on CUDA without a GPU: models built as fake CUDA
tensors (``FakeTensorMode``), forward in evaluation mode, and forward in
training mode followed by the backward pass, at 224, 448 and 576 px, batch 16,
per kNN backend, in float32 and under fp16 and bf16 CUDA autocast.  The cases
are a pairwise design: every precision meets every size in a GKGNet-S case, and
every value of each of the four factors (backend, precision, size, mode) meets
every value of each other factor (``test_the_cases_cover_every_pair``); Pyramid
ViG-S, whose stages are GKGNet's, takes each backend in each mode.

A fake tensor has no data, so any read back to the host (``.item()``,
``.tolist()``, ``bool(tensor)``) raises: a case that passes synchronises
nowhere.  Each case also checks that the output and every parameter gradient
are on the GPU, with the expected shapes and dtypes.  The backward pass runs
through ``benchmarks/fake_cuda.py``'s re-implementation of the engine's loop
(the engine itself needs a CUDA context); its gradients are checked against
``torch.autograd`` on real CPU tensors below.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

import gkg_pyg

from helpers import load_benchmark

fc = load_benchmark("fake_cuda")

BATCH, CLASSES = 16, 80
AUTOCAST = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


# (backend, precision, size, mode). GKGNet-S: each precision at each size, the backend and mode
# chosen so that every pair of factor values occurs (a full product would be 36 cases of the same
# code paths). The quick run (-m "not slow") keeps the three at 224 px: each backend, each mode,
# float32 and fp16.
GKGNET_S_CASES = [
    ("dense", "fp32", 224, "backward"),
    ("torch_cluster", "fp32", 448, "eval"),
    ("torch_cluster", "fp32", 576, "backward"),
    ("torch_cluster", "fp16", 224, "backward"),
    ("dense", "fp16", 448, "backward"),
    ("dense", "fp16", 576, "eval"),
    ("dense", "bf16", 224, "eval"),
    ("torch_cluster", "bf16", 448, "backward"),
    ("torch_cluster", "bf16", 576, "eval"),
]
PVIG_S_CASES = [
    ("dense", "fp32", 224, "backward"),
    ("torch_cluster", "fp16", 448, "eval"),
    ("dense", "bf16", 576, "eval"),
    ("torch_cluster", "bf16", 576, "backward"),
]


def installed(backend):
    """No mark, or the skip of a torch_cluster case without the package."""
    return [] if backend == "dense" or gkg_pyg.knn.has_torch_cluster() else [pytest.mark.skip("needs torch-cluster")]


def case(name, backend, amp, size, mode):
    marks = ([] if name == "gkgnet_s" and size == 224 else [pytest.mark.slow]) + installed(backend)
    return pytest.param(name, backend, amp, size, mode, marks=marks, id=f"{name}-{backend}-{amp}-{size}-{mode}")


# "backward" runs the training-mode forward pass (and checks its output) before the backward pass,
# so a separate forward-only training case would repeat a prefix of it.
CASES = [case("gkgnet_s", *c) for c in GKGNET_S_CASES] + [case("pvig_s", *c) for c in PVIG_S_CASES]


def test_the_cases_cover_every_pair():
    """GKGNet-S's cases: every value of each factor with every value of each other factor;
    Pyramid ViG-S's: each backend in each mode, and every precision and size."""
    values = [("dense", "torch_cluster"), ("fp32", "fp16", "bf16"), (224, 448, 576), ("eval", "backward")]
    for i, j in itertools.combinations(range(4), 2):
        pairs = {(c[i], c[j]) for c in GKGNET_S_CASES}
        assert pairs == set(itertools.product(values[i], values[j])), (i, j)
    assert {(c[0], c[3]) for c in PVIG_S_CASES} == set(itertools.product(values[0], values[3]))
    assert {c[1] for c in PVIG_S_CASES} == set(values[1]) and {c[2] for c in PVIG_S_CASES} == set(values[2])


@functools.lru_cache(maxsize=None)
def build(name: str, size: int, backend: str):
    """The model's parameters and buffers made as fake CUDA tensors (built in fake mode), once
    per model, size and backend: the cases of one model differ in precision and mode, and each
    starts without gradients."""
    mode = fc.fake_mode()
    with mode, torch.device("cuda"):
        model = gkg_pyg.create_model(name, num_classes=CLASSES, img_size=size, knn_backend=backend)
    return model, mode


def check_on_gpu(tensors, what):
    wrong = [name for name, t in tensors if t.device.type != "cuda"]
    assert not wrong, f"{what} not on the GPU: {wrong[:5]}"


@pytest.mark.parametrize("name, backend, amp, size, mode", CASES)
def test_fake_cuda(name, backend, amp, size, mode):
    model, fake = build(name, size, backend)
    model.zero_grad(set_to_none=True)
    dtype = AUTOCAST[amp]
    with fake:
        check_on_gpu(list(model.named_parameters()) + list(model.named_buffers()), "parameters and buffers")
        x = torch.randn(BATCH, 3, size, size, device="cuda")
        model.train(mode != "eval")
        with torch.set_grad_enabled(mode != "eval"), fc.fake_cuda_autocast(dtype):
            out = model(x)
        assert out.shape == (BATCH, CLASSES) and out.device.type == "cuda"
        # Under autocast the logits come out of a linear map in the autocast dtype (or float32 where
        # the model sums in float32); without it, in float32.
        assert out.dtype in ({torch.float32} if dtype is None else {dtype, torch.float32}), out.dtype
        assert out.requires_grad == (mode != "eval")
        if mode != "backward":
            return
        loss = out.float().sigmoid().mean()
        del out
        fc.backward([loss])
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, f"parameters without a gradient: {missing[:5]}"
        grads = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
        check_on_gpu(grads, "gradients")
        wrong = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.dtype != p.dtype]
        assert not wrong, f"gradients of another dtype than their parameter: {wrong[:5]}"


def test_backward_matches_autograd_on_real_tensors():
    """The backward pass used above gives torch.autograd's gradients on real CPU
    tensors (GKGNet-Ti, training mode, custom operators included)."""
    torch.manual_seed(0)
    model = gkg_pyg.create_model("gkgnet_ti", num_classes=5, img_size=48, k=4).train()
    x = torch.randn(2, 3, 48, 48)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model(x).square().mean().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    fc.backward([model(x).square().mean()])
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, want[n], rtol=1e-6, atol=1e-7, msg=n)


def test_a_host_read_on_fake_cuda_fails():
    """What the cases above rely on: reading a fake tensor's value raises."""
    from torch._subclasses.fake_tensor import DataDependentOutputException

    with fc.fake_mode(), torch.device("cuda"):
        x = torch.randn(4)
        with pytest.raises(DataDependentOutputException):
            x.sum().item()
        with pytest.raises(DataDependentOutputException):
            bool((x > 0).any())


@pytest.mark.parametrize("backend", [pytest.param(b, marks=installed(b)) for b in ("dense", "torch_cluster")])
def test_group_knn_api_on_fake_cuda(backend):
    """The library API without batch vectors reads nothing back on fake CUDA;
    with batch vectors it names the problem (graph sizes need values)."""
    with fc.fake_mode(), torch.device("cuda"):
        x_src, x_dst = torch.randn(300, 16), torch.randn(500, 16)
        edges = gkg_pyg.group_knn(x_src, x_dst, 9, 2, backend=backend)
        assert edges.shape == (2, 2, 500 * 9) and edges.device.type == "cuda"
        table = gkg_pyg.batched_group_knn(x_src.view(3, 100, 16), x_dst.view(5, 100, 16)[:3], 9, 2, backend=backend)
        assert table.shape == (2, 3, 100, 9) and table.device.type == "cuda"
        batch = torch.zeros(300, dtype=torch.long)
        with pytest.raises(ValueError, match="batched_group_knn"):
            gkg_pyg.group_knn(x_src, x_src, 9, 2, batch_src=batch, batch_dst=batch, backend=backend)
