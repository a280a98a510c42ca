"""Throughput and peak memory of gkg-pyg per kNN backend, eager and compiled.

Prints one table: images/s and peak memory for an eval forward pass and for
a training step (forward, backward, AdamW step) of GKGNet as built by this
library, once per kNN backend (dense, and torch-cluster when installed),
with ``--compile`` also under ``torch.compile`` (the first, compiling step
is timed separately and printed), plus the first stage's group kNN alone for
each backend.  For the comparison with the authors' implementation see
benchmarks/authors.py.  For gkg-pyg rows a second, separately timed pass measures the share
of the step spent in the group kNN (the kNN calls timed one by one, with
device synchronisation around them, so that pass is not the one whose
images/s is printed).  Every row runs in a fresh process so that peak memory
is its own.  Compare rows of one run only: timings on a shared machine are
noisy.

``GFLOP/s`` is the row's matrix-product and convolution work per step
(``torch.utils.flop_counter``, counted in one extra step) over its time: how
close the row comes to the dense-matrix-product rate of the device, which the
header gives (the best of a few 2048^3 products in the row's dtype).

    python benchmarks/throughput.py --model gkgnet_s --img-size 224 --batch 8 --device cpu
    python benchmarks/throughput.py --img-size 448 --batch 16 --device cuda --amp fp16 --compile
    python benchmarks/throughput.py --compile --compile-backend aot_eager   # trace only, no code generation

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed
steps; on the CPU the process's maximum resident set (model, warm-up step and
interpreter included).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def build(variant: str, img_size: int, num_classes: int, backend: str):
    import gkg_pyg

    return gkg_pyg.create_model(f"gkgnet_{variant}", num_classes=num_classes, img_size=img_size, knn_backend=backend)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(args, device):
    if args.amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[args.amp])


class KnnTimer:
    """Wraps the models' ``batched_group_knn`` (the patch path's in models.pvig, the
    label path's in models.gkgnet) and adds up its wall time."""

    def __init__(self, device):
        from gkg_pyg.models import gkgnet, pvig

        self.modules, self.device, self.seconds = (gkgnet, pvig), device, 0.0
        self.original = pvig.batched_group_knn

    def __enter__(self):
        def timed(*args, **kwargs):
            sync(self.device)
            start = time.perf_counter()
            out = self.original(*args, **kwargs)
            sync(self.device)
            self.seconds += time.perf_counter() - start
            return out

        for module in self.modules:
            module.batched_group_knn = timed
        return self

    def __exit__(self, *exc):
        for module in self.modules:
            module.batched_group_knn = self.original


def timed_steps(step, iters: int, device) -> tuple:
    """``(seconds per step, peak MiB)`` over ``iters`` calls of a warmed-up ``step``: on CUDA
    ``torch.cuda.max_memory_allocated`` over them, on the CPU the process's maximum resident set
    (model, warm-up and interpreter included)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    seconds = (time.perf_counter() - start) / iters
    if device.type == "cuda":
        return seconds, torch.cuda.max_memory_allocated() / 2**20
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(args, impl: str, task: str, queue):
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    backend = impl[impl.index("[") + 1 : impl.index("]")]  # "gkg_pyg[dense]+compile" -> "dense"
    if task == "knn":
        queue.put(measure_knn(args, backend, device))
        return
    compiled = impl.endswith("+compile")
    model = build(args.variant, args.img_size, args.num_classes, backend).to(device)
    module = model
    if compiled:
        model = torch.compile(model, backend=args.compile_backend)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    targets = (torch.rand(args.batch, args.num_classes, device=device) < 0.1).float()
    if task == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

        def step():
            with autocast(args, device):
                logits = model(images)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), targets)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
    else:
        model.eval()

        def step():
            with torch.no_grad(), autocast(args, device):
                model(images)

    start = time.perf_counter()
    step()  # warm-up (also builds the position tables; compiles a compiled row)
    sync(device)
    first_step = time.perf_counter() - start
    seconds, peak = timed_steps(step, args.iters, device)
    # Counted on the eager module (a compiled one runs the same products) with autograd on: the
    # counter's module tracking fails under no_grad on some models, and an eval forward does the
    # same products either way.
    with FlopCounterMode(display=False) as flops, autocast(args, device):
        out = module(images)
        if task == "train":
            out.float().sum().backward()
    module.zero_grad(set_to_none=True)
    gflop = flops.get_total_flops() / 1e9
    knn_share = float("nan")
    if not compiled:  # a second pass, timing the kNN calls one by one
        with KnnTimer(device) as timer:
            start = time.perf_counter()
            for _ in range(args.iters):
                step()
            sync(device)
            knn_share = timer.seconds / (time.perf_counter() - start)
    queue.put(
        dict(
            impl=impl,
            task=task,
            ms=seconds * 1e3,
            ips=args.batch / seconds,
            peak_mib=peak,
            gflops=gflop / seconds,
            knn_share=knn_share,
            first_step_s=first_step,
        )
    )


def measure_knn(args, backend: str, device):
    """The first stage's patch-level group kNN for the whole batch, with the
    position term the model passes to that backend."""
    from gkg_pyg.knn import batched_group_knn
    from gkg_pyg.geometry import POOL, stage_grids
    from gkg_pyg.models.pvig import VARIANTS, Stage

    grid = stage_grids(args.img_size, args.img_size)[0]
    channels = VARIANTS[args.variant].channels[0]
    stage = Stage(channels, channels, grid, POOL[0], [1], [0.0], 9, 2, backend, downsample=False).to(device)
    n, n_src = grid[0] * grid[1], (grid[0] // POOL[0]) * (grid[1] // POOL[0])
    dtype = AMP_DTYPES.get(args.amp, torch.float32) if device.type == "cuda" else torch.float32
    bias = stage.knn_position_bias(grid, backend, dtype)
    x_dst = torch.randn(args.batch, n, channels, device=device, dtype=dtype)
    x_src = torch.randn(args.batch, n_src, channels, device=device, dtype=dtype)

    def step():
        batched_group_knn(x_src, x_dst, 9, 2, position_bias=bias, backend=backend)

    step()
    sync(device)
    seconds, peak = timed_steps(step, args.iters, device)
    with FlopCounterMode(display=False) as flops:
        step()
    return dict(
        impl=f"group_knn[{backend}]",
        task="knn stage 1",
        ms=seconds * 1e3,
        ips=args.batch / seconds,
        peak_mib=peak,
        gflops=flops.get_total_flops() / 1e9 / seconds,
        knn_share=1.0,
    )


def run_isolated(args, impl, task):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=measure, args=(args, impl, task, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        print(f"# {impl} {task}: the measuring process failed (exit code {proc.exitcode})", file=sys.stderr)
        nan = float("nan")
        return dict(impl=impl, task=task, ms=nan, ips=nan, peak_mib=nan, gflops=nan, knn_share=nan, first_step_s=nan)
    return queue.get()


def gemm_rate(args, device) -> float:
    """GFLOP/s of the best of five 2048 x 2048 x 2048 products in the rows'
    matrix-product dtype (the autocast dtype on CUDA, float32 on the CPU
    unless bf16 autocast)."""
    dtype = AMP_DTYPES[args.amp] if args.amp and (device.type == "cuda" or args.amp == "bf16") else torch.float32
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(6):
        sync(device)
        start = time.perf_counter()
        a @ a
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best / 1e9


def main(argv=None):
    from gkg_pyg.cli import add_compile_backend_argument, check_compile_backend
    from gkg_pyg.errors import UsageError

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gkgnet_s", help="gkgnet_ti | gkgnet_s | gkgnet_m | gkgnet_b")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu | cuda")
    parser.add_argument(
        "--backend",
        nargs="+",
        default=None,
        help="gkg-pyg kNN backends to run as rows (default: dense, plus torch_cluster if installed)",
    )
    parser.add_argument(
        "--amp", choices=sorted(AMP_DTYPES), default=None, help="autocast dtype (fp16 trains with a loss scaler)"
    )
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: torch's)")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also time every gkg-pyg row under torch.compile")
    add_compile_backend_argument(parser)
    args = parser.parse_args(argv)
    args.variant = args.model.replace("gkgnet_", "")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(
            f"--device {args.device} needs a CUDA GPU, but torch {torch.__version__} sees none "
            f"(torch.cuda.is_available() is False); run on a GPU machine or use --device cpu"
        )
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        parser.error(f"unknown device {args.device!r}; expected cpu or cuda")

    from gkg_pyg.knn import has_torch_cluster

    if args.compile:
        try:
            check_compile_backend(args.compile_backend)
        except UsageError as error:
            parser.error(str(error))
    backends = args.backend or (["dense", "torch_cluster"] if has_torch_cluster() else ["dense"])
    for b in backends:
        if b not in ("dense", "torch_cluster"):
            parser.error(f"unknown backend {b!r}; expected dense or torch_cluster")
        if b == "torch_cluster" and not has_torch_cluster():
            parser.error("backend torch_cluster requested but torch-cluster is not installed")
    if args.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(args.device))
        name = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    else:
        if args.threads:  # the header's product rate at the rows' thread count
            torch.set_num_threads(args.threads)
        name = f"CPU, {torch.get_num_threads()} threads"
    print(
        f"# {args.model} at {args.img_size}x{args.img_size}, batch {args.batch}, {name}, torch {torch.__version__}, "
        f"amp {args.amp or 'off (fp32)'}, {args.iters} timed iterations per row, "
        + (f"compile backend {args.compile_backend}, " if args.compile else "")
        + f"dense matrix products {gemm_rate(args, torch.device(args.device)):.0f} GFLOP/s"
    )
    rows = []
    for task in ("eval", "train") if not args.skip_train else ("eval",):
        for backend in backends:
            rows.append(run_isolated(args, f"gkg_pyg[{backend}]", task))
            if args.compile:
                rows.append(run_isolated(args, f"gkg_pyg[{backend}]+compile", task))
    for backend in backends:
        rows.append(run_isolated(args, f"group_knn[{backend}]", "knn"))
    print(
        f"| {'implementation':<24} | {'task':<12} | {'ms/iter':>9} | {'images/s':>9} | {'peak MiB':>9} "
        f"| {'GFLOP/s':>9} | {'kNN share':>9} | {'first step s':>12} |"
    )
    print(f"|{'-' * 26}|{'-' * 14}|{'-' * 11}|{'-' * 11}|{'-' * 11}|{'-' * 11}|{'-' * 11}|{'-' * 14}|")
    for r in rows:
        share = "" if r["knn_share"] != r["knn_share"] else f"{100 * r['knn_share']:.0f}%"
        first = f"{r['first_step_s']:.1f}" if "first_step_s" in r else ""
        print(
            f"| {r['impl']:<24} | {r['task']:<12} | {r['ms']:>9.1f} | {r['ips']:>9.2f} | {r['peak_mib']:>9.0f} "
            f"| {r['gflops']:>9.0f} | {share:>9} | {first:>12} |"
        )


if __name__ == "__main__":
    main()
