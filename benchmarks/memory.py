"""Peak memory of a training step of GKGNet-S, gkg-pyg against the authors'
model, estimated without a GPU.

    python benchmarks/memory.py --authors /work/authors_harness                  # the paper-scale table
    python benchmarks/memory.py --sizes 576 --amp fp16 --breakdown 12            # what holds the memory
    python benchmarks/memory.py --validate --authors /work/authors_harness      # the estimator against real CPU runs

The step is the one the authors' harness measures (``peak_memory.py``): two
iterations of forward, BCE loss, backward and AdamW step (lr 1e-4), batch of
random images and labels, the peak over both (the second holds the optimizer
state).  Every model is built as fake tensors on ``--device`` (default
``cuda``) and the step runs on them (``benchmarks/fake_cuda.py``): no data,
no GPU, a few seconds per configuration.  :class:`fake_cuda.MemoryTracker`
accounts each storage from its allocation to its release, rounded to the
CUDA caching allocator's 512-byte blocks, so the peak estimates
``torch.cuda.max_memory_allocated`` (not the allocator's reserved memory,
which adds its fragmentation).  Not counted: buffers that a kernel allocates
for itself inside one operator (cuDNN's convolution workspaces, oneDNN's
scratchpads), and the temporaries inside ``gkg_pyg::cluster_knn`` (see
``fake_cuda.py``).  ``--amp fp16``: CUDA autocast (fp16), the loss
in float32; the gradient scaler is left out (its unscale works in place, on
the gradients it is given).

``--validate`` checks the estimator against real tensors on this CPU (224
batch 8 and 448 batch 4, float32, both implementations): each real step runs
in a fresh process with ``GKG_PYG_NATIVE=0`` (the PyTorch paths, which are
also what runs on a GPU) and reports the allocator-level peak (the
profiler's memory events summed over the step, above what lived before it)
and the peak resident set above the idle process with the model built; the
estimate is the tracker's peak on fake CPU tensors, less what lived before
the step.  ``--breakdown N``: the N largest holders at the peak (model state,
and activations by the module that made them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
import fake_cuda as fc  # noqa: E402

import gkg_pyg  # noqa: E402

CLASSES = 80


def build(who: str, size: int, backend: str, device: str, mode):
    """GKGNet-S as fake tensors on ``device`` (``who``: ``gkg_pyg`` or ``authors``)."""
    if who == "gkg_pyg":
        with mode, torch.device(device):
            return gkg_pyg.create_model("gkgnet_s", num_classes=CLASSES, img_size=size, knn_backend=backend)
    import numpy as np
    import official_pkg.vig_model.torch_vertex as vertex
    from official_model import OfficialGKGNet

    # The authors build their (n, n) position tables in numpy (3.4 GB at 576 px, float64); the
    # values do not matter for fake tensors, so a zero-stride stand-in of the same shape is used.
    real = vertex.get_2d_relative_pos_embed
    vertex.get_2d_relative_pos_embed = lambda dim, grid: np.lib.stride_tricks.as_strided(
        np.zeros(1, np.float32), shape=(grid * grid, grid * grid), strides=(0, 0)
    )
    try:  # built on real CPU tensors (its constructor reads values), then moved to fake ones
        model = OfficialGKGNet(size=size, choice="s", n_classes=CLASSES)
    finally:
        vertex.get_2d_relative_pos_embed = real
    with mode:
        return model.to_empty(device=device)


def autocast(device: str, amp: str):
    if amp == "fp32":
        return nullcontext()
    if device == "cuda":
        return fc.fake_cuda_autocast(torch.float16)
    return torch.autocast("cpu", dtype=torch.bfloat16)


def train_steps(model, optimizer, x, y, device: str, amp: str, tracker, run_backward) -> None:
    """Two iterations of the harness's training step."""
    model.train()
    for _ in range(2):
        with tracker.phase("forward"), autocast(device, amp):
            loss = F.binary_cross_entropy_with_logits(model(x).float(), y)
        optimizer.zero_grad()
        with tracker.phase("backward"):
            run_backward([loss])  # takes the only reference to the loss: the graph is freed as it runs
        with tracker.phase("optimizer"):
            optimizer.step()


def estimate(who, size, batch, backend, amp, device="cuda", snapshot_at=None, depth=3, harness=None):
    """The tracker's peak (bytes) over the step, the peak above what lived before
    the step, and the tracker (with ``snapshot_at``, its breakdown there)."""
    if harness is not None and str(harness) not in sys.path:
        sys.path.insert(0, str(harness))
    mode = fc.fake_mode(allow_non_fake_inputs=True)
    model = build(who, size, backend, device, mode)
    with mode:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, capturable=device == "cuda")
        x = torch.randn(batch, 3, size, size, device=device)
        y = (torch.rand(batch, CLASSES, device=device) > 0.9).float()
        # The CPU allocator reports the bytes asked for; CUDA's caching allocator rounds to 512.
        tracker = fc.MemoryTracker(round_to=512 if device == "cuda" else 1, snapshot_at=snapshot_at)
        tracker.watch_modules(model, depth)
        tracker.watch_state(model, optimizer)
        tracker.track_existing(model, x, y)
        before = tracker.live
        backward = fc.backward if device == "cuda" else _engine_backward
        with tracker:
            train_steps(model, optimizer, x, y, device, amp, tracker, backward)
        tracker.remove_hooks()
    return tracker.peak, tracker.peak - before, tracker


def _engine_backward(outputs):
    """PyTorch's own engine (fake CPU tensors need no CUDA context)."""
    loss = outputs.pop()
    loss.backward()


# ---------------------------------------------------------------------------
# Validation against real tensors on the CPU
# ---------------------------------------------------------------------------
def measure_real(who, size, batch, backend, harness) -> dict:
    """Runs in a fresh process: the real step on CPU tensors, its allocator-level
    peak (profiler memory events) and peak resident set, both above the idle
    process with the model built and the inputs made."""
    import resource

    from torch.profiler import ProfilerActivity, profile

    if harness is not None:
        sys.path.insert(0, str(harness))
    torch.manual_seed(0)
    if who == "gkg_pyg":
        model = gkg_pyg.create_model("gkgnet_s", num_classes=CLASSES, img_size=size, knn_backend=backend)
    else:
        from official_model import OfficialGKGNet

        model = OfficialGKGNet(size=size, choice="s", n_classes=CLASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size)
    y = (torch.rand(batch, CLASSES) > 0.9).float()
    idle = _rss_now()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_steps(model, optimizer, x, y, "cpu", "fp32", fc.MemoryTracker(), _engine_backward)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    from torch._C._profiler import _EventType

    allocations, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:  # every allocation (positive size) and release (negative) the CPU allocator reported
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            allocations.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(allocations):
        live += size
        peak = max(peak, live)
    return dict(allocator=peak, rss=peak_rss - idle)


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def validate(args) -> int:
    print("| model | size, batch | estimate MiB | real, allocator MiB | ratio | real, RSS MiB | ratio |")
    print("|---|---|---:|---:|---:|---:|---:|")
    worst = 0.0
    whos = [("gkg_pyg", b) for b in args.backends] + ([("authors", "-")] if args.authors else [])
    for size, batch in ((224, 8), (448, 4)):
        for who, backend in whos:
            env = dict(os.environ, GKG_PYG_NATIVE="0")
            cmd = [sys.executable, __file__, "--real", who, str(size), str(batch), backend]
            cmd += ["--authors", str(args.authors)] if args.authors else []
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(f"| {who} {backend} | {size}, {batch} | real run failed: {proc.stderr.strip()[-200:]} |")
                worst = float("inf")
                continue
            real = json.loads(proc.stdout.strip().splitlines()[-1])
            os.environ["GKG_PYG_NATIVE"] = "0"
            _, est, _ = estimate(who, size, batch, backend, "fp32", "cpu", harness=args.authors)
            name = f"{who}{'' if who == 'authors' else ' ' + backend}"
            r1, r2 = est / real["allocator"], est / max(1, real["rss"])
            worst = max(worst, abs(r1 - 1))
            print(
                f"| {name} | {size}, {batch} | {fc.mib(est):.0f} | {fc.mib(real['allocator']):.0f} | {r1:.3f} | "
                f"{fc.mib(real['rss']):.0f} | {r2:.3f} |",
                flush=True,
            )
    print(f"\nlargest deviation from the allocator-level measurement: {worst:.1%}")
    return 0 if worst <= 0.15 else 1


# ---------------------------------------------------------------------------
def table(args) -> None:
    print(
        f"# peak memory of a training step (2 iterations, AdamW), GKGNet-S, {args.device} (fake tensors), "
        f"torch {torch.__version__}"
    )
    print("| size | batch | precision | gkg-pyg kNN | gkg-pyg MiB | authors MiB | gkg-pyg / authors |")
    print("|---:|---:|---|---|---:|---:|---:|")
    for size in args.sizes:
        for amp in args.amp:
            authors = None
            if args.authors:
                authors, _, _ = estimate("authors", size, args.batch, "-", amp, args.device, harness=args.authors)
            for backend in args.backends:
                ours, _, _ = estimate("gkg_pyg", size, args.batch, backend, amp, args.device)
                ratio = f"{ours / authors:.2f}x" if authors else "-"
                theirs = f"{fc.mib(authors):.0f}" if authors else "-"
                print(
                    f"| {size} | {args.batch} | {amp} | {backend} | {fc.mib(ours):.0f} | {theirs} | {ratio} |",
                    flush=True,
                )


def breakdown(args) -> None:
    whos = [("gkg_pyg", b) for b in args.backends] + ([("authors", "-")] if args.authors else [])
    for size in args.sizes:
        for amp in args.amp:
            for who, backend in whos:
                peak, _, first = estimate(who, size, args.batch, backend, amp, args.device, harness=args.authors)
                _, _, second = estimate(
                    who, size, args.batch, backend, amp, args.device, first.peak_at, args.depth, args.authors
                )
                print(f"\n## {who} {backend}, {size} px, batch {args.batch}, {amp}: peak {fc.mib(peak):.0f} MiB")
                print("| held at the peak | MiB | share |\n|---|---:|---:|")
                for label, nbytes in list((second.snapshot or {}).items())[: args.breakdown]:
                    print(f"| {label} | {fc.mib(nbytes):.0f} | {nbytes / peak:.1%} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[448, 576])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--amp", nargs="+", default=["fp32", "fp16"], choices=["fp32", "fp16"])
    parser.add_argument("--backends", nargs="+", default=["dense", "torch_cluster"])
    parser.add_argument("--device", default="cuda", help="device of the fake tensors (cuda or cpu)")
    parser.add_argument("--authors", type=Path, help="the authors' harness folder (peak_memory.py's)")
    parser.add_argument("--breakdown", type=int, default=0, help="list the N largest holders at the peak")
    parser.add_argument("--depth", type=int, default=3, help="module name components in the breakdown")
    parser.add_argument("--validate", action="store_true", help="the estimator against real CPU steps")
    parser.add_argument("--real", nargs=4, metavar=("WHO", "SIZE", "BATCH", "BACKEND"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if "torch_cluster" in args.backends and not gkg_pyg.knn.has_torch_cluster():
        args.backends = [b for b in args.backends if b != "torch_cluster"]
    if args.real:
        who, size, batch, backend = args.real
        print(json.dumps(measure_real(who, int(size), int(batch), backend, args.authors)))
        return 0
    if args.validate:
        return validate(args)
    if args.breakdown:
        breakdown(args)
    else:
        table(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
