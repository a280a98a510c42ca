"""Everything issue 8 asks of a lent GPU, in one call: checks, benchmark, authors' harness.

    python experiments/gpu_check.py --device cuda --harness /path/to/authors_harness
    python experiments/gpu_check.py --device cpu --quick      # the checks alone, small, on the CPU

1. Checks on the device (each prints PASS or FAIL; the exit code is the
   number of failures):
   - the group kNN of GKGNet-S's first stage on the device, dense and
     torch-cluster backends, against the dense backend on the CPU: identical
     in float64, and in float32 identical wherever the answer is separated
     by more than 1e-4;
   - ``GroupMaxRelConv``'s neighbour-table path against its ``edge_index``
     path on the device (float64 outputs and gradients);
   - GKGNet-S on the device against the CPU (float64 logits, and the
     parameter gradients and running statistics of a training step), per backend;
   - one fp16-autocast training step per backend (finite loss and gradients).
2. ``experiments/benchmark.py --device cuda --amp fp16`` at each ``--sizes``
   with ``--batch`` (images/s, peak memory, share of the kNN, per backend).
3. With ``--harness`` (built by ``../shared/authors_gkgnet/make_harness.sh``):
   ``experiments/benchmark_authors.py --amp fp16`` (paired steps of both
   models, fp32 and fp16 autocast), then the harness's ``throughput.py``
   (fp32) and ``peak_memory.py`` (authors and gkg-pyg, training, fp16) at
   the same sizes and batch on the same card.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from gkg_pyg import GroupMaxRelConv, batched_group_knn, create_model  # noqa: E402
from gkg_pyg.knn import has_torch_cluster  # noqa: E402
from gkg_pyg.models.gkgnet import Stage  # noqa: E402

FAILURES = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        FAILURES.append(name)


def backends() -> list:
    return ["dense", "torch_cluster"] if has_torch_cluster() else ["dense"]


def check_knn(device: torch.device, size: int, batch: int) -> None:
    """Stage 1 of GKGNet-S (80 channels, pool 4, its position term as each
    backend gets it) on the device against the dense backend on the CPU."""
    grid = (size // 4, size // 4)
    stage = Stage(80, 80, grid, 4, [1], [0.0], 9, 2, "dense", downsample=False)
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(batch, grid[0] * grid[1], 80, generator=gen, dtype=torch.float64)
    src = stage.pool_sources(y, grid)
    for dtype in (torch.float64, torch.float32):
        for backend in backends():
            bias = stage.knn_position_bias(grid, backend, dtype)
            want = batched_group_knn(src.to(dtype), y.to(dtype), 9, 2, position_bias=bias, backend="dense")
            bias = tuple(b.to(device) for b in bias) if isinstance(bias, tuple) else bias.to(device)
            got = batched_group_knn(
                src.to(device, dtype), y.to(device, dtype), 9, 2, position_bias=bias, backend=backend
            ).cpu()
            same = (got == want).all(dim=-1).float().mean().item()
            # float32: distances rounded differently on another device may swap near-equal neighbours
            ok = same == 1.0 if dtype == torch.float64 else same > 0.999
            name = f"kNN {backend} on {device.type} = dense on cpu, {dtype}, {size} px b{batch}"
            check(name, ok, f"{same:.5f} of the rows equal")


def check_conv(device: torch.device) -> None:
    torch.manual_seed(0)
    conv = GroupMaxRelConv(80, 160, groups=2).double().to(device)
    x_src = torch.randn(392, 80, dtype=torch.float64, device=device)
    x_dst = torch.randn(1200, 80, dtype=torch.float64, device=device)
    table = torch.randint(0, 392, (2, 1200, 9), device=device)
    dst = torch.arange(1200, device=device).repeat_interleave(9).expand(2, -1)
    edges = torch.stack([table.reshape(2, -1), dst], dim=1)
    results = []
    for kwargs in (dict(neighbors=table), dict(edge_index=edges)):
        xs, xd = x_src.clone().requires_grad_(True), x_dst.clone().requires_grad_(True)
        conv.zero_grad()
        out = conv((xs, xd), **kwargs)
        out.square().sum().backward()
        results.append([out, xs.grad, xd.grad] + [p.grad for p in conv.parameters()])
    diff = max((a - b).abs().max().item() for a, b in zip(*results))
    check(
        f"GroupMaxRelConv table path = edge_index path on {device.type}, float64", diff < 1e-9, f"max diff {diff:.1e}"
    )


def check_model(device: torch.device, size: int) -> None:
    """GKGNet-S on the device against the same model on the CPU, per backend."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    weights = create_model("gkgnet_s", num_classes=80, img_size=size).state_dict()
    for backend in backends():
        model = create_model("gkgnet_s", num_classes=80, img_size=size, knn_backend=backend)
        model.load_state_dict(weights)
        model.double().eval()
        with torch.no_grad():
            want = model(x)
            got = model.to(device)(x.to(device)).cpu()
        diff = ((got - want).abs().max() / want.abs().max()).item()
        check(f"GKGNet-S on {device.type} = cpu, float64, {size} px, {backend}", diff < 1e-9, f"rel diff {diff:.1e}")
        check_training_gradients(model, x, device, backend)
        model.train().float()
        dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        with torch.autocast(device.type, dtype=dtype):
            loss = model(x.float().to(device)).float().sigmoid().mean()
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads)
        check(f"training step under {dtype} autocast on {device.type}, {backend}", finite, f"loss {loss.item():.4f}")


def check_training_gradients(model, x: torch.Tensor, device: torch.device, backend: str) -> None:
    """One float64 training-mode forward and backward (batch statistics, the
    fused blocks' own backward passes, the neighbour max's scatter) on the
    device against the CPU: every parameter gradient and the running statistics."""
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    results = []
    for dev in (torch.device("cpu"), device):
        model.load_state_dict(weights)
        model.to(dev).train().zero_grad(set_to_none=True)
        model(x.to(dev)).square().mean().backward()
        grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
        results.append((grads, {n: b.detach().cpu() for n, b in model.named_buffers() if b.is_floating_point()}))
    (grads_cpu, bufs_cpu), (grads_dev, bufs_dev) = results
    worst = max(((grads_dev[n] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item() for n, g in grads_cpu.items())
    stats = max((bufs_dev[n] - b).abs().max().item() for n, b in bufs_cpu.items())
    ok = grads_cpu.keys() == grads_dev.keys() and worst < 1e-8 and stats < 1e-9
    name = f"GKGNet-S training gradients on {device.type} = cpu, float64, {backend}"
    check(name, ok, f"{len(grads_cpu)} gradients, worst rel diff {worst:.1e}; running stats {stats:.1e}")
    model.load_state_dict(weights)


def run(cmd: list) -> None:
    print("$ " + " ".join(cmd), flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    code = subprocess.call(cmd, cwd=ROOT, env=env)
    check(" ".join(Path(c).name for c in cmd[:3]), code == 0, f"exit code {code}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", type=int, nargs="+", default=[448, 576])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--harness", type=Path, help="the authors' harness folder (make_harness.sh)")
    parser.add_argument("--quick", action="store_true", help="the checks only, at small sizes (a CPU self-test)")
    parser.add_argument("--no-checks", action="store_true", help="the benchmarks only (a second call)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible to torch")
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(f"kNN backends: {', '.join(backends())} (torch-cluster {'installed' if has_torch_cluster() else 'missing'})")
    if not args.no_checks:
        check_knn(device, 64 if args.quick else 448, 2)
        check_conv(device)
        check_model(device, 96 if args.quick else 224)
    if not args.quick:
        python = sys.executable
        for size in args.sizes:
            run(
                [
                    python,
                    "experiments/benchmark.py",
                    "--img-size",
                    str(size),
                    "--batch",
                    str(args.batch),
                    "--device",
                    args.device,
                    "--amp",
                    "fp16" if device.type == "cuda" else "bf16",
                    "--skip-reference",
                ]
            )
        if args.harness is not None:
            harness = args.harness.resolve()
            cuda = ["--device", "cuda"] if device.type == "cuda" else []
            for size in args.sizes:
                # paired fp16-autocast timing (the GPU goal), then the harness's own fp32 throughput
                run(
                    [
                        python,
                        "experiments/benchmark_authors.py",
                        "--harness",
                        str(harness),
                        "--device",
                        args.device,
                        "--img-size",
                        str(size),
                        "--batch",
                        str(args.batch),
                        "--rounds",
                        "4",
                        "--amp",
                        "fp16" if device.type == "cuda" else "bf16",
                    ]
                )
                run([python, str(harness / "throughput.py"), str(size), str(args.batch), "3", "train", "eval", *cuda])
                for who in ("authors", "gkg_pyg"):
                    run(
                        [
                            python,
                            str(harness / "peak_memory.py"),
                            who,
                            str(size),
                            str(args.batch),
                            "train",
                            *cuda,
                            "--amp",
                        ]
                    )
    print(f"{len(FAILURES)} failed" + (": " + "; ".join(FAILURES) if FAILURES else ""))
    return len(FAILURES)


if __name__ == "__main__":
    sys.exit(main())
