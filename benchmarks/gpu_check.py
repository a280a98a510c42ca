"""Everything a lent GPU should show about gkg-pyg, in one run, summed up in
one Markdown table to paste into an issue (``benchmarks/gpu.sh`` builds
torch-cluster first and calls this; see docs/gpu.md).

    python benchmarks/gpu_check.py --device cuda --harness /path/to/authors_harness --report gpu_report.md
    python benchmarks/gpu_check.py --smoke      # every step on the CPU at tiny sizes (a few minutes)
    python benchmarks/gpu_check.py --smoke --no-compile   # the same without compiling the demo (under 2 minutes)

``--smoke`` is a self-test of this script (``gpu.sh --dry-run``): every step
on the CPU at 224 px batch 1, each doing no more than its own work needs: the
``tests`` step runs one case of ``tests/test_fake_cuda.py``, the ``bench``
and ``memory`` steps the dense kNN backend only (the ``checks`` step still
compares both), the ``train`` step 96 + 48 images for 3 epochs. Its
mixed-precision rows are bfloat16 where the CPU computes it natively, else
float32 (:func:`amp_name`).

Steps (``--steps`` picks some; each row of the table says PASS, FAIL or the figures):

``checks``
    on the device against the CPU: the group kNN of GKGNet-S's first stage,
    dense and torch-cluster backends (identical in float64; in float32
    identical wherever the answer is separated by more than 1e-4);
    ``GroupMaxRelConv``'s neighbour-table path against its ``edge_index`` path
    (float64 outputs and gradients); GKGNet-S (float64 logits, and the
    parameter gradients and running statistics of a training step) per
    backend; one mixed-precision training step per backend, finite loss and
    gradients (fp16 autocast; in a CPU smoke run bf16 where the CPU computes
    it natively, else float32).
``tests``
    ``pytest -m "not slow"`` (the suite; tests that can use the GPU do) and
    ``tests/test_fake_cuda.py`` (CUDA code paths without data).
``bench``
    ``benchmarks/throughput.py`` at each size with ``--batch`` and fp16
    autocast, per backend: images/s, peak memory (``max_memory_allocated``)
    and the share of the step spent in the group kNN, evaluation and training.
``memory``
    ``benchmarks/memory.py``: the estimated peak of the training step (fake
    tensors, the same step as the authors' harness) next to the measured one.
``authors``
    with ``--harness``: ``benchmarks/authors.py`` (paired steps, fp32 and fp16
    autocast) and the harness's ``peak_memory.py`` for both models, on the same
    card.
``train``
    ``experiments/train.py experiments/configs/demo.yaml`` with AMP and
    ``--compile``: stopped after some epochs, resumed to the end; the loss must
    fall, the checkpoint must be written and the resumed run must continue
    from it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from gkg_pyg import GroupMaxRelConv, batched_group_knn, create_model  # noqa: E402
from gkg_pyg.knn import has_torch_cluster  # noqa: E402
from gkg_pyg.models.pvig import Stage  # noqa: E402
from gkg_pyg.training.precision import build_precision  # noqa: E402

STEPS = ["checks", "tests", "bench", "memory", "authors", "train"]
FAILURES = []
ROWS = []  # (step, result, details) of the summary table


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}{': ' + detail if detail else ''}", flush=True)
    ROWS.append(("check", "PASS" if ok else "FAIL", f"{name}{': ' + detail if detail else ''}"))
    if not ok:
        FAILURES.append(name)


def row(step: str, result: str, details: str = "") -> None:
    ROWS.append((step, result, details))
    if result == "FAIL":
        FAILURES.append(f"{step}: {details}")


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


def check_model(device: torch.device, size: int, knn_backends: list) -> None:
    """GKGNet-S on the device against the same model on the CPU, per kNN backend."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    weights = create_model("gkgnet_s", num_classes=80, img_size=size).state_dict()
    for backend in knn_backends:
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
        amp = amp_name(device)  # float32 on a CPU without native bfloat16 (emulated, it took 7x as long)
        name = f"training step under {amp} autocast" if amp else "float32 training step"
        name += f" on {device.type}, {backend}"
        try:
            with build_precision(amp or "none", device).autocast():
                loss = model(x.float().to(device)).float().sigmoid().mean()
            loss.backward()
        except Exception as e:  # a failure of this check, not of the run
            check(name, False, f"{type(e).__name__}: {str(e)[:200]}")
            continue
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads)
        check(name, finite, f"loss {loss.item():.4f}")


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


def run(cmd: list, timeout: float = 3600) -> subprocess.CompletedProcess:
    """Run a command from the repository root, echo its output, return it."""
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    try:
        proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        print(f"timed out after {timeout:.0f} s", flush=True)
        return subprocess.CompletedProcess(e.cmd, 124, e.stdout or "", e.stderr or "")
    print(proc.stdout + proc.stderr, flush=True)
    return proc


def last_line(proc: subprocess.CompletedProcess) -> str:
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return lines[-1][:160] if lines else f"exit code {proc.returncode}"


def step_tests(args) -> None:
    python = sys.executable
    try:
        import pytest  # noqa: F401
    except ImportError:
        row("tests", "SKIP", "pytest is not installed here")
        return
    if args.smoke:  # one case: the step's own work (run pytest, read its summary) and no more
        suites = [
            ("tests: fake CUDA", ["tests/test_fake_cuda.py", "-k", "gkgnet_s and dense and fp32 and 224-backward"])
        ]
    else:
        suites = [("tests: not slow", ["-m", "not slow"]), ("tests: fake CUDA", ["tests/test_fake_cuda.py"])]
    for name, selection in suites:
        # One pytest process, no workers: pytest-xdist may be missing on the GPU machine.
        proc = run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra", *selection])
        summary = next(
            (line for line in reversed(proc.stdout.splitlines()) if re.search(r"\d+ (passed|failed|error)", line)),
            last_line(proc),
        )
        row(name, "PASS" if proc.returncode == 0 else "FAIL", summary.strip("= "))


def amp_name(device: torch.device) -> Optional[str]:
    """The autocast dtype of the mixed-precision rows: fp16 on CUDA; on the CPU bf16 where it
    computes bfloat16 natively, else none (float32 rows: emulated bfloat16 products ran about
    150x slower than float32 on an AVX2 CPU, and the smoke run took 10 minutes instead of 2)."""
    if device.type == "cuda":
        return "fp16"
    native = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    return "bf16" if native() else None


def amp_args(device: torch.device) -> list:
    return ["--amp", amp_name(device)] if amp_name(device) else []


def precision(device: torch.device) -> str:
    return amp_name(device) or "fp32"


def table_cells(stdout: str):
    """The stripped cells of every Markdown table line a script printed."""
    for line in stdout.splitlines():
        yield [c.strip() for c in line.strip().strip("|").split("|")]


def bench_command(args, device: torch.device, size: int) -> list:
    """``benchmarks/throughput.py`` at one size (in a smoke run the dense backend only:
    every row is a process of its own)."""
    cmd = [sys.executable, "benchmarks/throughput.py", "--img-size", size, "--batch", args.batch]
    cmd += ["--device", device.type, *amp_args(device), "--iters", args.iters]
    return cmd + (["--backend", "dense"] if args.smoke else [])


def bench_rows(stdout: str, args, device: torch.device, size: int) -> list:
    """The summary rows of throughput.py's table: one per backend and task."""
    rows = []
    for cells in table_cells(stdout):
        if len(cells) == 8 and cells[0].startswith("gkg_pyg["):
            impl, task, _, ips, peak, _, share, _ = cells
            variant = impl.removeprefix("gkg_pyg[").replace("]", "")  # "dense", "dense+compile"
            name = f"GKGNet-S {size} px b{args.batch} {precision(device)} {task}, {variant}"
            if ips == "nan":  # the row's process failed (its error is in the log above)
                rows.append((name, "FAIL", "the measuring process failed"))
                continue
            details = f"{ips} img/s, peak {peak} MiB" + (f", kNN {share} of the step" if share else "")
            rows.append((name, "ok", details))
    return rows


def step_bench(args, device) -> None:
    """benchmarks/throughput.py at each size: one summary row per backend and task."""
    for size in args.sizes:
        proc = run(bench_command(args, device, size))
        if proc.returncode != 0:
            row(f"GKGNet-S {size} px b{args.batch} {precision(device)}", "FAIL", last_line(proc))
            continue
        for summary in bench_rows(proc.stdout, args, device, size):
            row(*summary)


def memory_command(args, size: int) -> list:
    """``benchmarks/memory.py``: the estimator's peak (fake tensors) for the harness's training step."""
    cmd = [sys.executable, "benchmarks/memory.py", "--sizes", size, "--batch", args.batch, "--amp", "fp16"]
    cmd += ["--backends", *(["dense"] if args.smoke else backends())]
    return cmd + (["--authors", args.harness] if args.harness else [])


def memory_rows(stdout: str, args, size: int) -> list:
    """The summary rows of memory.py's table: one per backend."""
    rows = []
    for cells in table_cells(stdout):
        if len(cells) == 7 and cells[0] == str(size):
            _, _, _, backend, ours, theirs, ratio = cells
            details = f"gkg-pyg {ours} MiB" + (f", authors {theirs} MiB ({ratio})" if theirs != "-" else "")
            rows.append((f"estimated peak, train step {size} px b{args.batch} fp16, {backend}", "ok", details))
    return rows


def step_memory(args, device) -> None:
    for size in args.sizes:
        proc = run(memory_command(args, size))
        if proc.returncode != 0:
            row(f"estimated peak, train step {size} px b{args.batch} fp16", "FAIL", last_line(proc))
            continue
        for summary in memory_rows(proc.stdout, args, size):
            row(*summary)


def step_authors(args, device) -> None:
    harness = Path(args.harness).resolve()
    cuda = ["--device", "cuda"] if device.type == "cuda" else []
    for size in args.sizes:
        cmd = [sys.executable, "benchmarks/authors.py", "--harness", harness, "--device", device.type]
        cmd += ["--img-size", size, "--batch", args.batch, "--rounds", args.rounds, *amp_args(device)]
        proc = run(cmd)
        if proc.returncode != 0:
            row(f"paired {size} px b{args.batch}", "FAIL", last_line(proc))
        for cells in table_cells(proc.stdout):
            if len(cells) == 4 and cells[0] in ("eval", "train"):
                row(f"paired {size} px b{args.batch} {cells[0]}: {cells[1]}", "ok", f"{cells[2]} img/s, {cells[3]}")
        for who in ("authors", "gkg_pyg"):
            amp = ["--amp"] if amp_name(device) else []
            proc = run([sys.executable, harness / "peak_memory.py", who, size, args.batch, "train", *cuda, *amp])
            ok = proc.returncode == 0
            name = f"harness peak memory {size} px b{args.batch} train {'amp' if amp else 'fp32'}, {who}"
            row(name, "ok" if ok else "FAIL", last_line(proc))


def step_train(args, device) -> None:
    """The demo config with AMP and --compile: stopped, resumed, loss falling."""
    out = Path(tempfile.mkdtemp(prefix="gkg_pyg_gpu_train_"))
    sets = [f"train.amp={amp_name(device) or 'none'}", f"output.dir={out}"]
    sets += [f"data.root={out / 'data'}"]
    if args.smoke:  # a tiny run: 96 + 48 images, 3 epochs
        sets += ["data.synthetic.num_train=96", "data.synthetic.num_val=48", "train.batch_size=16"]
        epochs, stop = 3, 2
    else:
        epochs, stop = 5, 3
    sets += [f"train.epochs={epochs}"]
    base = [sys.executable, "experiments/train.py", "experiments/configs/demo.yaml", "--output", out / "run"]
    base += [] if args.no_compile else ["--compile"]
    overrides = [a for kv in sets for a in ("--set", kv)]
    start = time.time()
    first = run(base + overrides + ["--set", f"train.stop_after_epochs={stop}"])
    ckpt = out / "run" / "checkpoint_last.pth"
    if first.returncode != 0 or not ckpt.exists():
        row(f"training demo ({precision(device)}, compile)", "FAIL", f"first part: {last_line(first)}")
        return
    second = run(base + overrides + ["--resume", ckpt])
    log = out / "run" / "log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    losses = [r["loss"] for r in records]
    resumed = f"resumed from {ckpt} after epoch {stop}" in (second.stdout + second.stderr)
    ok = second.returncode == 0 and len(records) == epochs and resumed and losses[-1] < losses[0]
    details = (
        f"loss {' -> '.join(f'{x:.3f}' for x in losses)}; checkpoint after epoch {stop}, "
        f"{'resumed' if resumed else 'NOT resumed'} to epoch {len(records)}; "
        f"{'compiled, ' if not args.no_compile else ''}{time.time() - start:.0f} s"
    )
    if second.returncode != 0:
        details += f"; {last_line(second)}"
    row(
        f"training demo ({precision(device)}" + ("" if args.no_compile else ", --compile") + ", resume)",
        "PASS" if ok else "FAIL",
        details,
    )
    shutil.rmtree(out, ignore_errors=True)


def report(args, device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}"
    else:
        where = f"CPU smoke run ({torch.get_num_threads()} threads)"
    cluster = "installed" if has_torch_cluster() else "missing"
    lines = [
        f"**gkg-pyg on {where}**: torch {torch.__version__}, CUDA {torch.version.cuda}, torch-cluster {cluster}, "
        f"{len(FAILURES)} failed",
        "",
        "| step | result | details |",
        "|---|---|---|",
    ]
    lines += [f"| {step} | {result} | {details.replace('|', '/')} |" for step, result, details in ROWS]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", type=int, nargs="+", default=[448, 576])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per throughput row")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of the paired timing against the authors")
    parser.add_argument("--harness", type=Path, help="the authors' harness folder (make_harness.sh)")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=STEPS)
    parser.add_argument("--report", type=Path, help="also write the summary table to this file")
    parser.add_argument("--no-compile", action="store_true", help="train without --compile")
    parser.add_argument("--quick", action="store_true", help="the checks only, at small sizes")
    parser.add_argument(
        "--smoke", action="store_true", help="every step on the CPU at tiny sizes (a self-test of this script)"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.sizes, args.batch, args.iters, args.rounds = "cpu", [224], 1, 1, 1
    if args.quick:
        args.steps = ["checks"]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible to torch (use --smoke for the CPU self-test)")
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(f"kNN backends: {', '.join(backends())} (torch-cluster {'installed' if has_torch_cluster() else 'missing'})")
    for step in args.steps:
        try:
            run_step(step, args, device)
        except Exception as e:  # a step that crashes is a failed row; the others still run
            row(step, "FAIL", f"{type(e).__name__}: {str(e)[:200]}")
            import traceback

            traceback.print_exc()
    text = report(args, device)
    print("\n" + text)
    if args.report:
        args.report.write_text(text)
    print(f"{len(FAILURES)} failed" + (": " + "; ".join(FAILURES) if FAILURES else ""))
    return len(FAILURES)


def run_step(step: str, args, device: torch.device) -> None:
    small = args.smoke or args.quick
    if step == "checks":
        check_knn(device, 64 if small else 448, 2)
        check_conv(device)
        # A smoke run compares the CPU with itself: one backend runs the code (the kNN checks cover both).
        check_model(device, 96 if small else 224, ["dense"] if args.smoke else backends())
    elif step == "tests":
        step_tests(args)
    elif step == "bench":
        step_bench(args, device)
    elif step == "memory":
        step_memory(args, device)
    elif step == "authors":
        if args.harness is None:
            row("authors", "SKIP", "no --harness given")
        else:
            step_authors(args, device)
    elif step == "train":
        step_train(args, device)


if __name__ == "__main__":
    sys.exit(main())
