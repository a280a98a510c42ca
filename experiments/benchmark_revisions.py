"""Paired timing of gkg-pyg at a git revision against the working tree, in one process.

    python experiments/benchmark_revisions.py --base 33df072 --img-size 224 --batch 8 --rounds 8

The revision's ``gkg_pyg`` is extracted with ``git archive`` into a temporary
folder as the package ``gkg_pyg_base`` (the package imports itself only
relatively, so both versions load side by side, each with its own compiled
kernels). GKGNet-S is built from both with the same weights, and every round
runs one step of each in turn, the order alternating from round to round, as
``benchmark_authors.py`` does against the authors' code (whose ``step`` this
script uses). The table gives each side's median images/s and the median over
rounds of the working tree's speed ratio to the revision. On the shared
2-core machine of this project the same code measured up to 10% apart from
one process to the next, while paired ratios in one process repeat to about
1%: compare revisions with this script, not with separate runs.
"""

from __future__ import annotations

import argparse
import importlib
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "experiments")]
import gkg_pyg  # noqa: E402
from benchmark_authors import step  # noqa: E402

_ABSOLUTE_IMPORT = re.compile(r"^\s*(from|import)\s+gkg_pyg\b", re.MULTILINE)


def load_revision(revision: str, folder: Path):
    """The package ``gkg_pyg`` of ``revision`` as the module ``gkg_pyg_base``."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "gkg_pyg"], capture_output=True, check=False)
    if archive.returncode != 0:
        raise SystemExit(f"--base {revision}: git archive failed: {archive.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        # The archive is this repository's own; the "data" filter exists from Python 3.11.4 on.
        tar.extractall(folder, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    package = (folder / "gkg_pyg").rename(folder / "gkg_pyg_base")
    for source in package.rglob("*.py"):  # an absolute import would load the working tree's module instead
        if _ABSOLUTE_IMPORT.search(source.read_text()):
            raise SystemExit(f"--base {revision}: {source.relative_to(folder)} imports gkg_pyg by name")
    sys.path.insert(0, str(folder))
    return importlib.import_module("gkg_pyg_base")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="git revision to compare the working tree with")
    parser.add_argument("--model", default="gkgnet_s")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tasks", nargs="+", choices=["eval", "train"], default=["eval", "train"])
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.batch < 1:
        parser.error("--rounds and --batch must be at least 1")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        base = load_revision(args.base, Path(folder))
        models = {}
        for name, package in ((args.base, base), ("working tree", gkg_pyg)):
            torch.manual_seed(0)
            models[name] = package.create_model(args.model, num_classes=80, img_size=args.img_size)
        try:  # the same weights, where the two revisions' state dicts agree
            models[args.base].load_state_dict(models["working tree"].state_dict())
        except RuntimeError as error:
            print(f"(state dicts differ, both models seeded alike: {str(error).splitlines()[0]})")
        x = torch.randn(args.batch, 3, args.img_size, args.img_size)
        y = (torch.rand(args.batch, 80) > 0.9).float()
        print(
            f"{args.model}, {args.img_size} px, batch {args.batch}, CPU, {args.threads} threads, {args.rounds} rounds"
        )
        print(f"| task | revision | images/s (median) | speed / {args.base} (median of rounds, min-max) |")
        print("|---|---|---|---|")
        for task in args.tasks:
            optims = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
            scaler = torch.amp.GradScaler("cpu", enabled=False)
            names = list(models)
            for name in names:  # warm-up
                step(models[name], optims[name], scaler, task, x, y, None)
            times = {name: [] for name in names}
            for r in range(args.rounds):
                for name in names if r % 2 == 0 else names[::-1]:
                    times[name].append(step(models[name], optims[name], scaler, task, x, y, None))
            for name in names:
                ratios = [a / b for a, b in zip(times[args.base], times[name])]
                print(
                    f"| {task} | {name} | {args.batch / statistics.median(times[name]):.2f} | "
                    f"{statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f}) |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
