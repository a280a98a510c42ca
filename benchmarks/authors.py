"""Paired timing of gkg-pyg against the authors' GKGNet: one step of each in turn.

The authors' code is not part of this project: build a runnable copy outside
it with ``../shared/authors_gkgnet/make_harness.sh GIT_DIR OUT_DIR`` and pass
``--harness OUT_DIR``. Both models (GKGNet-S, random weights, 80 classes) live
in one process; every round runs one step of each configuration, in turn,
and the table gives each configuration's median images/s and the median over
rounds of its speed ratio to the authors' float32 step. Every other round runs
the configurations in reverse order. Slow changes of a
shared machine's load hit both sides of a round alike, so the ratios are
steadier than timings of blocks of steps (compare ratios, not images/s).

    python benchmarks/authors.py --harness /work/authors_harness --img-size 224 --batch 8
    python benchmarks/authors.py --harness ... --img-size 224 --batch 8 --compile
    python benchmarks/authors.py --harness ... --img-size 448 --batch 4 --amp bf16 --rounds 4
    python benchmarks/authors.py --harness ... --device cuda --img-size 576 --batch 16 --amp fp16

Each configuration first runs ``--warmup`` untimed steps (3; the configurations in
turn): both implementations run their first steps up to 2x slower than later ones
while the process's heap grows (measured here: the authors' training step 14.5,
11.1, 7.7 s, then 6-7.5 s; gkg-pyg's 5.4, 5.6, 3.9 s, then 2.4-2.7 s), and
a timed round among them would count that once-only cost.

A training step is forward, backward (BCE on random targets) and AdamW.
``--amp bf16|fp16`` adds both models under autocast as two more rows (the
ratios stay relative to the authors' float32 step; fp16 trains with a loss
scaler, as the paper's recipe does). ``--compile`` adds gkg-pyg under
``torch.compile`` (the same module, weights and optimiser as the eager row),
prints how long its first, compiling step took and its speed-up over eager
gkg-pyg from further rounds of those two alone, paired round by round like
the ratios to the authors (with the authors' step between them that ratio
was 0.94-1.09x for the evaluation in five runs of one day on the Zen 3). On
CUDA every step is synchronised before and after its timing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gkg_pyg  # noqa: E402


def load_authors(harness: Path):
    if not (harness / "official_model.py").is_file():
        raise SystemExit(
            f"--harness {harness}: no official_model.py there; build it with "
            "../shared/authors_gkgnet/make_harness.sh GIT_DIR OUT_DIR"
        )
    sys.path.insert(0, str(harness))
    from official_model import OfficialGKGNet

    return OfficialGKGNet


def step(model, optimizer, scaler, task: str, x, y, amp_dtype) -> float:
    """Seconds for one eval forward or one training step (forward, backward, AdamW)."""
    model.train(task == "train")
    synchronize(x.device)
    start = time.perf_counter()
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        if task == "train":
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), y)
        else:
            with torch.no_grad():
                model(x)
    if task == "train":
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    synchronize(x.device)
    return time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--harness", type=Path, required=True, help="folder built by make_harness.sh")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration before the rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--amp", choices=["bf16", "fp16"], help="also time both models under autocast")
    parser.add_argument("--tasks", nargs="+", choices=["eval", "train"], default=["eval", "train"])
    parser.add_argument("--compile", action="store_true", help="also time gkg-pyg under torch.compile")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.batch < 1 or args.warmup < 1:
        parser.error("--rounds, --batch and --warmup must be at least 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU visible to torch")
    authors_cls = load_authors(args.harness.resolve())
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {
        "authors": authors_cls(size=args.img_size, choice="s").to(device),
        "gkg_pyg": gkg_pyg.create_model("gkgnet_s", num_classes=80, img_size=args.img_size).to(device),
    }
    rows = {"authors, fp32": ("authors", None), "gkg-pyg, fp32": ("gkg_pyg", None)}
    if args.amp:
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
        rows[f"authors, {args.amp} autocast"] = ("authors", amp_dtype)
        rows[f"gkg-pyg, {args.amp} autocast"] = ("gkg_pyg", amp_dtype)
    if args.compile:
        # The compiled module shares the eager one's parameters, so one optimiser serves both.
        models["gkg_pyg compiled"] = torch.compile(models["gkg_pyg"])
        rows["gkg-pyg, fp32, torch.compile"] = ("gkg_pyg compiled", None)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    y = (torch.rand(args.batch, 80, device=device) > 0.9).float()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"GKGNet-S, {args.img_size} px, batch {args.batch}, {where}, {args.rounds} rounds")
    print("| task | configuration | images/s (median) | speed / authors fp32 (median of rounds, min-max) |")
    print("|---|---|---|---|")
    for task in args.tasks:
        bench_task(task, args, models, rows, x, y)


def bench_task(task: str, args: argparse.Namespace, models: dict, rows: dict, x, y) -> None:
    """Warm-up steps, then the timed rounds of every configuration (``rows``: row name -> (model name,
    autocast dtype)) for ``task``; prints the task's table rows and, with ``--compile``, the speed-up
    of torch.compile over eager gkg-pyg."""
    optims = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    if args.compile:
        optims["gkg_pyg compiled"] = optims["gkg_pyg"]
    scalers = {row: torch.amp.GradScaler(x.device.type, enabled=amp == torch.float16) for row, (_, amp) in rows.items()}

    def run(row: str) -> float:
        name, amp = rows[row]
        return step(models[name], optims[name], scalers[row], task, x, y, amp)

    for warmup in range(args.warmup):  # the first steps (for torch.compile, compilation), in turn
        for row in rows:
            seconds = run(row)
            if warmup == 0 and rows[row][0] == "gkg_pyg compiled":
                print(f"{task}: first torch.compile step {seconds:.1f} s (compilation included)", flush=True)
    times = timed_rounds(run, list(rows), args.rounds)
    for row in rows:
        speed = paired_speedup(times["authors, fp32"], times[row])
        print(f"| {task} | {row} | {args.batch / statistics.median(times[row]):.2f} | {speed} |", flush=True)
    if args.compile:  # rounds of the two alone: with the authors' step between them the ratio was 0.94-1.09x
        pair = timed_rounds(run, ["gkg-pyg, fp32", "gkg-pyg, fp32, torch.compile"], args.rounds)
        speed = paired_speedup(*pair.values(), digits=3)
        print(f"{task}: torch.compile against eager gkg-pyg, {args.rounds} paired rounds of the two: {speed}")


def timed_rounds(run, rows: list, rounds: int) -> dict:
    """Seconds of ``run(row)`` per row, the rows in turn, ``rounds`` times; every other round in
    reverse order, so that what a step leaves behind (caches, the heap) precedes each row alike."""
    times = {row: [] for row in rows}
    for round_ in range(rounds):
        for row in rows[:: -1 if round_ % 2 else 1]:
            times[row].append(run(row))
    return times


def paired_speedup(baseline: list, timed: list, digits: int = 2) -> str:
    """``"median x (min-max)"`` of the per-round speed-ups ``baseline / timed`` (seconds per step,
    round by round): the rounds' pairing cancels the machine's slow drifts."""
    ratios = [a / b for a, b in zip(baseline, timed, strict=True)]
    return f"{statistics.median(ratios):.{digits}f}x ({min(ratios):.2f}-{max(ratios):.2f})"


if __name__ == "__main__":
    main()
