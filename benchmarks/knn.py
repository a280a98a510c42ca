"""Time and peak memory of the first stage's group kNN, per backend and API.

The problem is GKGNet's first patch-level graph: destinations are the
stage-1 patches (112 x 112 at 448 px), sources the 4 x 4-pooled patches,
k = 9, G = 2, dilation 1, the stage's relative-position term as the bias.
The inputs are built once, in a separate process, and saved; each case runs
in a fresh process that loads them and prints ms per call (the fastest of
``--iters``), the process's peak
resident set (``ru_maxrss``: interpreter and inputs included) and the growth
of that peak over the loaded inputs (what the kNN itself added; on CUDA the
peak of ``torch.cuda.max_memory_allocated`` and its growth).  Cases:

* ``group_knn`` with batch vectors and the dense ``(n, n_src)`` bias (the
  library API; what the model passed until the factored bias);
* ``batched`` = ``batched_group_knn`` with the dense bias or with the bias
  factored as ``(U, V)``, ``r = C`` columns (the exact table has rank C; the
  factors come from its SVD).

Compare rows of one run only: timings on a shared machine are noisy.
``--pythonpath`` runs the cases against another checkout (e.g. an older
commit unpacked with ``git archive``) for before/after tables; cases that
checkout lacks are reported as failed.

    python benchmarks/knn.py --img-size 448 --batch 1
    python benchmarks/knn.py --img-size 224 --batch 8 --backends dense
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CASES = [
    (api, backend, bias)
    for backend in ("dense", "torch_cluster")
    for api, bias in (("group_knn", "dense"), ("batched", "dense"), ("batched", "factored"))
]


def make_inputs(args) -> None:
    """Runs in its own process: the stage-1 problem, saved to ``args.inputs``."""
    import torch

    from gkg_pyg.geometry import stage_grids
    from gkg_pyg.models.positions import relative_position_table
    from gkg_pyg.models.pvig import VARIANTS

    torch.manual_seed(0)
    grid = stage_grids(args.img_size, args.img_size)[0]
    channels = VARIANTS[args.variant].channels[0]
    n, n_src = grid[0] * grid[1], (grid[0] // 4) * (grid[1] // 4)
    table = relative_position_table(grid, channels, 4)
    left, sing, right = torch.linalg.svd(table.double(), full_matrices=False)
    u, v = (left[:, :channels] * sing[:channels]).float(), right[:channels].t().float()
    torch.save(
        dict(
            table=table,
            u=u,
            v=v,
            x_dst=torch.randn(args.batch, n, channels),
            x_src=torch.randn(args.batch, n_src, channels),
            factor_error=float((u @ v.t() - table).abs().max()),
        ),
        args.inputs,
    )


def child(args) -> dict:
    """Runs in the fresh process: load the inputs, time the calls, report as JSON."""
    import resource
    import time

    import torch

    from gkg_pyg import knn

    device = torch.device(args.device)
    inputs = torch.load(args.inputs)
    bias = inputs["table"].to(device) if args.bias == "dense" else (inputs["u"].to(device), inputs["v"].to(device))
    x_src, x_dst = inputs["x_src"].to(device), inputs["x_dst"].to(device)
    error = inputs["factor_error"] if args.bias == "factored" else 0.0
    channels, n_src, n = x_src.shape[2], x_src.shape[1], x_dst.shape[1]
    del inputs
    if args.api == "batched":

        def step():
            return knn.batched_group_knn(x_src, x_dst, 9, 2, position_bias=bias, backend=args.backend)
    else:
        b_dst = torch.arange(args.batch, device=device).repeat_interleave(n)
        b_src = torch.arange(args.batch, device=device).repeat_interleave(n_src)
        flat_src, flat_dst = x_src.reshape(-1, channels), x_dst.reshape(-1, channels)

        def step():
            return knn.group_knn(
                flat_src, flat_dst, 9, 2, batch_src=b_src, batch_dst=b_dst, position_bias=bias, backend=args.backend
            )

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    inputs_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        inputs_cuda = torch.cuda.memory_allocated() / 2**20
    step()  # warm-up
    sync()
    seconds = float("inf")
    for _ in range(args.iters):  # the fastest call: the least disturbed by other work on the machine
        start = time.perf_counter()
        step()
        sync()
        seconds = min(seconds, time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    added = peak - inputs_rss
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        added = peak - inputs_cuda
    return dict(ms=seconds * 1e3, peak_mib=peak, added_mib=added, bias_error=error)


def run_child(args, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        __file__,
        "--img-size",
        str(args.img_size),
        "--batch",
        str(args.batch),
        "--variant",
        args.variant,
        "--device",
        args.device,
        "--iters",
        str(args.iters),
        "--inputs",
        args.inputs,
        *extra,
    ]
    env = dict(os.environ)
    if args.pythonpath and "--make-inputs" not in extra:  # the inputs come from this checkout's model code
        env["PYTHONPATH"] = args.pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def run_case(args, api: str, backend: str, bias: str) -> dict:
    proc = run_child(args, "--child", "--api", api, "--backend", backend, "--bias", bias)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return dict(
            ms=float("nan"), peak_mib=float("nan"), added_mib=float("nan"), bias_error=float("nan"), failed=last[:80]
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", type=int, default=448)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--variant", default="s", help="ti | s | m | b (GKGNet / Pyramid ViG width)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=["dense", "torch_cluster"])
    parser.add_argument("--apis", nargs="+", default=["group_knn", "batched"])
    parser.add_argument("--pythonpath", default="", help="import gkg_pyg from this folder instead")
    parser.add_argument("--biases", nargs="+", default=["dense", "factored"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--make-inputs", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", default="", help=argparse.SUPPRESS)
    parser.add_argument("--api", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--bias", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.make_inputs:
        make_inputs(args)
        return
    import tempfile

    import torch

    name = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"CPU, {torch.get_num_threads()} threads (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})"
    )
    print(
        f"# stage-1 group kNN of GKGNet-{args.variant.upper()} at {args.img_size} px, batch {args.batch}, {name}, "
        f"torch {torch.__version__}{', gkg_pyg from ' + args.pythonpath if args.pythonpath else ''}"
    )
    print(f"| {'call':<10} | {'backend':<13} | {'bias':<8} | {'ms/call':>9} | {'peak MiB':>9} | {'added MiB':>9} |")
    print(f"|{'-' * 12}|{'-' * 15}|{'-' * 10}|{'-' * 11}|{'-' * 11}|{'-' * 11}|")
    with tempfile.TemporaryDirectory() as tmp:
        args.inputs = os.path.join(tmp, "inputs.pt")
        made = run_child(args, "--make-inputs")
        if made.returncode != 0:
            sys.exit(f"building the inputs failed:\n{made.stderr}")
        for api, backend, bias in CASES:
            if api in args.apis and backend in args.backends and bias in args.biases:
                print_row(api, backend, bias, run_case(args, api, backend, bias))


def print_row(api: str, backend: str, bias: str, r: dict) -> None:
    print(
        f"| {api:<10} | {backend:<13} | {bias:<8} | {r['ms']:>9.1f} | {r['peak_mib']:>9.0f} | "
        f"{r['added_mib']:>9.0f} |" + (f" failed: {r['failed']}" if "failed" in r else ""),
        flush=True,
    )


if __name__ == "__main__":
    main()
