"""The memory estimator of benchmarks/memory.py (``benchmarks/fake_cuda.py``'s
``MemoryTracker`` and backward pass): against hand counts, against the CPU
allocator's own record of a real training step, and its backward pass
against the autograd engine's memory behaviour."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import load_benchmark

fc = load_benchmark("fake_cuda")

N = 1000


def test_hand_count_of_a_chain():
    """a (4N bytes) -> b = 2a -> free a -> c = b + 1 -> free b: peak 2 x 4N,
    views cost nothing, a released tensor is subtracted."""
    with fc.MemoryTracker(round_to=1) as tracker:
        a = torch.randn(N)
        assert tracker.live == 4 * N
        b = a * 2
        view = b[::2]  # a view: no new storage
        del a
        assert tracker.live == 4 * N
        c = b + 1
        del b
        assert tracker.live == 8 * N  # the view keeps b's storage alive
        del view
        assert tracker.live == 4 * N
        del c
    assert tracker.live == 0 and tracker.peak == 8 * N


def test_rounding_to_allocator_blocks():
    with fc.MemoryTracker(round_to=512) as tracker:
        x = torch.empty(3)  # 12 bytes -> one 512-byte block
        y = torch.empty(129)  # 516 bytes -> two blocks
        assert tracker.live == 512 + 1024
        del x, y


def test_fake_tensors_are_counted_like_real_ones():
    with fc.fake_mode(), torch.device("cuda"):
        with fc.MemoryTracker(round_to=1) as tracker:
            a = torch.randn(N, 8)
            b = a.t().contiguous()
            del a
            assert b.device.type == "cuda"
            del b
    assert tracker.peak == 2 * 4 * 8 * N and tracker.live == 0


class Net(nn.Module):
    """A small conv net with BatchNorm, GELU and a linear head."""

    def __init__(self, depth: int = 3):
        super().__init__()
        layers = [nn.Conv2d(3, 16, 3, padding=1)]
        for _ in range(depth):
            layers += [nn.BatchNorm2d(16), nn.GELU(), nn.Conv2d(16, 16, 3, padding=1)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def training_steps(model, x, y, tracker, backward):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tracker.track_existing(model, x, y)
    before = tracker.live
    with tracker:
        for _ in range(2):
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            backward([loss])
            del loss
            optimizer.step()
    return tracker.peak - before


def engine_backward(outputs):
    outputs.pop().backward()


def test_fake_estimate_matches_real_tensors_and_the_cpu_allocator_record():
    """The estimate on fake tensors equals the same account of the real step
    (real CPU tensors), and lies just below the CPU allocator's own record of
    that step (profiler memory events, summed in time order): the allocator
    also sees the scratch buffers that kernels allocate inside one operator
    (here oneDNN's convolution workspaces), which no dispatch-level account can."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = Net()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        on_real = training_steps(model, x, y, fc.MemoryTracker(round_to=1), engine_backward)
    allocations, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            allocations.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    live = allocator = 0
    for _, size in sorted(allocations):
        live += size
        allocator = max(allocator, live)

    with fc.fake_mode():
        fake_model = Net()
        fx, fy = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        estimate = training_steps(fake_model, fx, fy, fc.MemoryTracker(round_to=1), engine_backward)
    assert on_real > 1e6
    assert abs(estimate / on_real - 1) < 0.01, (estimate, on_real)
    assert 0.8 < estimate / allocator <= 1.0, (estimate, allocator)


@pytest.mark.parametrize("depth", [2, 8])
def test_python_backward_frees_like_the_engine(depth):
    """The backward pass without the engine releases each node's saved tensors
    once it has run: the same peak as torch.autograd's engine (real tensors).
    Keeping them would grow the peak with the depth."""
    torch.manual_seed(0)
    peaks = []
    for backward in (engine_backward, fc.backward):
        model = Net(depth)
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        peaks.append(training_steps(model, x, y, fc.MemoryTracker(round_to=1), backward))
    engine, python = peaks
    assert abs(python / engine - 1) < 0.05, peaks


def test_breakdown_names_the_model_state():
    with fc.fake_mode(), torch.device("cuda"):
        model = Net()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=True)
        tracker = fc.MemoryTracker(round_to=1)
        tracker.watch_modules(model)
        tracker.watch_state(model, optimizer)
        tracker.track_existing(model)
        x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
        with tracker:
            with tracker.phase("forward"):
                loss = nn.functional.cross_entropy(model(x), y)
            fc.backward([loss])
            optimizer.step()
        tracker.remove_hooks()
        parts = tracker.breakdown()
    param_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert parts["parameters"] == param_bytes
    assert parts["gradients"] == param_bytes
    assert parts["optimizer state"] >= 2 * param_bytes  # exp_avg, exp_avg_sq (+ the step counters)


def test_memory_script_prints_the_table_the_gpu_script_reads(monkeypatch, capsys):
    """benchmarks/memory.py's table with the GPU script's memory-step command (smoke settings, at
    96 px; the estimate itself, tested above, replaced by a number): one row per size and backend,
    which the step turns into its summary row."""
    gpu_check, memory = load_benchmark("gpu_check"), load_benchmark("memory")
    monkeypatch.setattr(memory, "estimate", lambda *args, **kwargs: (743 * 2**20, None, None))
    args = gpu_check.parse_args(["--smoke"])
    cmd = gpu_check.memory_command(args, 96)
    assert Path(cmd[1]).name == "memory.py"
    assert memory.main([str(c) for c in cmd[2:]]) == 0
    rows = gpu_check.memory_rows(capsys.readouterr().out, args, 96)
    assert rows == [("estimated peak, train step 96 px b1 fp16, dense", "ok", "gkg-pyg 743 MiB")], rows
