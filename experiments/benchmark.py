"""Throughput and peak memory of gkg-pyg against the dense reference.

Prints one table: images/s and peak memory for an eval forward pass and for
a training step (forward, backward, AdamW step) of GKGNet as built by this
library and of the plain-PyTorch dense reference in tests/reference_gkgnet.py
(same architecture, same weights), plus the group kNN alone for each
backend.  Every row runs in a fresh process so that peak memory is its own.
Compare rows of one run only: timings on a shared machine are noisy.

    python experiments/benchmark.py --model gkgnet_s --img-size 224 --batch 8 --device cpu
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def build(impl: str, variant: str, img_size: int, num_classes: int, backend: str):
    import gkg_pyg
    model = gkg_pyg.create_model(f"gkgnet_{variant}", num_classes=num_classes, img_size=img_size,
                                 knn_backend=backend)
    if impl == "reference":
        sys.path.insert(0, str(ROOT / "tests"))
        from reference_gkgnet import ReferenceGKGNet
        ref = ReferenceGKGNet(variant, num_classes=num_classes, img_size=img_size)
        ref.load_state_dict(gkg_pyg.export_authors_checkpoint(model)["state_dict"])
        return ref
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(args, impl: str, task: str, queue):
    torch.manual_seed(0)
    device = torch.device(args.device)
    if task == "knn":
        queue.put(measure_knn(args, impl, device))
        return
    model = build(impl, args.variant, args.img_size, args.num_classes, args.backend).to(device)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    targets = (torch.rand(args.batch, args.num_classes, device=device) < 0.1).float()
    if task == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(images), targets)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        model.eval()

        def step():
            with torch.no_grad():
                model(images)
    step()  # warm-up (also builds the position tables)
    sync(device)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    sync(device)
    seconds = (time.perf_counter() - start) / args.iters
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:  # max resident set of this process (includes the model and the warm-up)
        peak = max(base_rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024
    queue.put(dict(impl=impl, task=task, ms=seconds * 1e3, ips=args.batch / seconds, peak_mib=peak))


def measure_knn(args, backend: str, device):
    """The first stage's patch-level group kNN for the whole batch."""
    from gkg_pyg import group_knn
    from gkg_pyg.models.gkgnet import relative_position_table, stage_grids
    import gkg_pyg.models.gkgnet as gk
    grid = stage_grids(args.img_size, args.img_size)[0]
    channels = gk.VARIANTS[args.variant].channels[0]
    n, n_src = grid[0] * grid[1], (grid[0] // 4) * (grid[1] // 4)
    bias = relative_position_table(grid, channels, 4).to(device)
    x_dst = torch.randn(args.batch * n, channels, device=device)
    x_src = torch.randn(args.batch * n_src, channels, device=device)
    b_dst = torch.arange(args.batch, device=device).repeat_interleave(n)
    b_src = torch.arange(args.batch, device=device).repeat_interleave(n_src)

    def step():
        group_knn(x_src, x_dst, 9, 2, batch_src=b_src, batch_dst=b_dst, position_bias=bias, backend=backend)
    step()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    sync(device)
    seconds = (time.perf_counter() - start) / args.iters
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    return dict(impl=f"group_knn[{backend}]", task="knn stage 1", ms=seconds * 1e3, ips=args.batch / seconds,
                peak_mib=peak)


def run_isolated(args, impl, task):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=measure, args=(args, impl, task, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        return dict(impl=impl, task=task, ms=float("nan"), ips=float("nan"), peak_mib=float("nan"))
    return queue.get()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gkgnet_s", help="gkgnet_ti | gkgnet_s | gkgnet_m | gkgnet_b")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto", help="kNN backend of gkg-pyg: auto | dense | torch_cluster")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()
    args.variant = args.model.replace("gkgnet_", "")

    from gkg_pyg.knn import has_torch_cluster, resolve_backend
    chosen = resolve_backend(args.backend, torch.device(args.device))
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {args.model} at {args.img_size}x{args.img_size}, batch {args.batch}, {name}, "
          f"torch {torch.__version__}, kNN backend: {chosen} (requested {args.backend})")
    rows = []
    for task in ("eval", "train") if not args.skip_train else ("eval",):
        for impl in ("gkg_pyg", "reference"):
            rows.append(run_isolated(args, impl, task))
    for backend in ("dense", "torch_cluster") if has_torch_cluster() else ("dense",):
        rows.append(run_isolated(args, backend, "knn"))
    print(f"| {'implementation':<24} | {'task':<12} | {'ms/iter':>9} | {'images/s':>9} | {'peak MiB':>9} |")
    print(f"|{'-' * 26}|{'-' * 14}|{'-' * 11}|{'-' * 11}|{'-' * 11}|")
    for r in rows:
        print(f"| {r['impl']:<24} | {r['task']:<12} | {r['ms']:>9.1f} | {r['ips']:>9.2f} | {r['peak_mib']:>9.0f} |")


if __name__ == "__main__":
    main()
