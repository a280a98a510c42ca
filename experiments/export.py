"""Export a trained GKGNet to ONNX (and torch.export) at a fixed input size
and any batch size, and check the exported model against PyTorch.

    python experiments/export.py --checkpoint runs/demo/checkpoint_best.pth --output demo.onnx
    python experiments/export.py --checkpoint CKPT --output model.onnx --batch-size 8 --check img1.jpg img2.jpg
    python experiments/export.py --checkpoint CKPT --output model.onnx --torch-export model.pt2
    python experiments/export.py --checkpoint CKPT --output model.onnx --verify   # check an existing file only
    gkg-export --checkpoint CKPT --output model.onnx             # the same, installed as a command

The exported graph is the model on its dense kNN path (matrix products and
``topk``; no torch-cluster, no host synchronisation) at one input size,
with a dynamic batch dimension and the normalisation inside:

* input ``image``: float32 (batch, 3, size, size), RGB scaled to 0..1, i.e.
  the image decoded to 8-bit RGB (``gkg_pyg.data.load_rgb``: EXIF
  orientation applied, transparency over white), resized bicubically to
  size x size and divided by 255;
* outputs ``logits`` and ``scores`` (= sigmoid(logits)), float32 (batch, L).

The ONNX file's metadata (``metadata_props``) holds ``class_names`` (JSON
list), ``preprocess`` (JSON: img_size, resize, mean, std; the mean and std
are applied inside the graph), ``thresholds`` (JSON: the per-class and
global thresholds stored by evaluate.py --choose-thresholds, when present)
and ``input_range`` ("0..1"). size is the checkpoint's preprocess size
(--img-size overrides it).

After exporting, onnxruntime runs the file on --check images (default:
deterministic random inputs) and the script compares it with the model
run by PyTorch in float64 (the same weights cast to double), the
reference that rounding cannot move. In float32 a kNN distance near a tie
can be ordered either way, and two float32 runtimes (PyTorch, onnxruntime)
make such a choice differently on some images: that changes a neighbour
and the scores downstream (by 1e-3 and more), yet the export is right. So
the check reads the neighbours the ONNX graph chose (the outputs of its
``TopK`` nodes) and runs the float64 reference with those neighbours:

* every neighbour choice must be one the float64 distances allow up to
  --tie-margin (default 1e-4): the j-th chosen source of a destination
  lies within the margin of the j-th smallest distance. A choice outside
  it is a wrong graph (another k, dilation, position term or distance);
  choices within it are reported as near-tied neighbours;
* with the same neighbours, the scores must agree within --tolerance
  (default 1e-4; measured about 1e-6): wrong weights or operators show here.

It reports the largest score difference, the near-tied neighbour choices,
whether the top-k labels agree and, for comparison, how far PyTorch's own
float32 run is from float64, and fails (exit status 1) on either rule.
Where the ONNX graph's kNN choices cannot be read (no ``TopK`` nodes),
the scores are compared with the float64 reference as they are.
``torch.onnx.export(dynamo=True)``, which goes through ``torch.export``,
is used; --torch-export also saves that program. Needs the optional
extra: ``pip install -e .[export]`` (onnx, onnxruntime, onnxscript).

A mistake in an option or the checkpoint stops with one line, ``error:
...`` (exit status 2; --debug adds the traceback).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

if not __package__:  # run as a file (python experiments/export.py): import gkg_pyg from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gkg_pyg import knn as knn_module  # noqa: E402
from gkg_pyg.builder import load_trained_model  # noqa: E402
from gkg_pyg.cli import ArgumentParser, run_cli  # noqa: E402
from gkg_pyg.data import checkpoint_preprocess, load_rgb  # noqa: E402
from gkg_pyg.errors import CheckpointError, MissingFileError, UsageError  # noqa: E402
from gkg_pyg.models.layers import fold_batchnorms  # noqa: E402
from gkg_pyg.ops import plain_decompositions  # noqa: E402
from gkg_pyg.thresholds import read_thresholds, thresholds_json  # noqa: E402


class ExportedGKGNet(nn.Module):
    """The model with its normalisation: 0..1 RGB in, (logits, scores) out."""

    def __init__(self, model: nn.Module, mean, std) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor):
        logits = self.model((image - self.mean) / self.std)
        return logits, torch.sigmoid(logits)


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="trained weights")
    p.add_argument("--output", required=True, help="the ONNX file to write")
    p.add_argument("--config", help="YAML config (default: the one saved in the checkpoint)")
    p.add_argument("--ema", action="store_true", help="export the checkpoint's EMA weights")
    p.add_argument("--img-size", type=int, help="input size (default: the checkpoint's)")
    p.add_argument(
        "--batch-size", type=int, default=2, help="batch size of the check runs (the exported graph takes any)"
    )
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (18 or later: torch.onnx's exporter)")
    p.add_argument("--torch-export", metavar="PATH", help="also save the torch.export program (.pt2)")
    p.add_argument("--check", nargs="*", default=[], metavar="IMAGE", help="images for the onnxruntime check")
    p.add_argument("--topk", type=int, default=3, help="top-k labels compared in the check")
    p.add_argument(
        "--tolerance", type=float, default=1e-4, help="largest score difference to float64 with the same neighbours"
    )
    p.add_argument(
        "--tie-margin",
        type=float,
        default=1e-4,
        help="how far (in kNN distance) a neighbour the ONNX graph chose may be from float64's choice",
    )
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime check")
    p.add_argument("--verify", action="store_true", help="check the existing --output file; export nothing")
    args = p.parse_args(argv)
    if args.verify and args.no_check:
        p.error("--verify checks the file and --no-check skips the check: give one of them")
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.topk < 1:
        p.error(f"--topk must be >= 1, got {args.topk}")
    if args.opset < 18:  # torch.onnx's exporter writes 18 at least and would silently raise a lower request
        p.error(f"--opset must be 18 or later (torch.onnx's exporter), got {args.opset}")
    if args.img_size is not None and args.img_size < 1:
        p.error(f"--img-size must be >= 1, got {args.img_size}")
    if not args.tolerance > 0 or not args.tie_margin >= 0:
        p.error(f"--tolerance must be > 0 and --tie-margin >= 0, got {args.tolerance} and {args.tie_margin}")
    for option, path in (("--output", args.output), ("--torch-export", args.torch_export)):
        if path is not None and Path(path).is_dir():  # checked before minutes of exporting
            p.error(f"{option} {path} is a folder; give the file to write, e.g. {Path(path) / 'model.onnx'}")
    return args


def onnx_opset(proto) -> int:
    """The default-domain opset a written ONNX model declares."""
    return next(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))


def load_for_export(args: argparse.Namespace):
    """(wrapped model in eval mode on the dense kNN path, class names, preprocess, thresholds record)."""
    model, class_names, cfg, checkpoint = load_trained_model(args.checkpoint, args.config, args.ema)
    if cfg.get("task") == "single_label":
        raise UsageError(
            f"{args.checkpoint} is a single-label checkpoint (task: single_label); export.py exports "
            "multi-label models with sigmoid scores and does not support it yet (predict.py does)"
        )
    model.set_knn_backend("dense")  # matrix products and topk: plain ONNX operators
    preprocess = checkpoint_preprocess(checkpoint, cfg)
    if args.img_size:
        preprocess["img_size"] = int(args.img_size)
    record = read_thresholds(checkpoint, "ema" if args.ema else "model", class_names)
    wrapped = ExportedGKGNet(model, preprocess["mean"], preprocess["std"]).eval()
    return wrapped, class_names, preprocess, record


def check_inputs(paths, preprocess: dict, batch_size: int) -> list[torch.Tensor]:
    """Batches of 0..1 RGB inputs: the --check images (cycled to fill the last
    batch) or two deterministic random batches."""
    size = int(preprocess["img_size"])
    if not paths:
        g = torch.Generator().manual_seed(0)
        return [torch.rand(batch_size, 3, size, size, generator=g) for _ in range(2)]
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    images = [TF.to_tensor(TF.resize(load_rgb(p), [size, size], InterpolationMode.BICUBIC)) for p in paths]
    while len(images) % batch_size:
        images.append(images[len(images) % len(paths)])
    return [torch.stack(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]


# ---------------------------------------------------------------------------
# The check: onnxruntime against PyTorch float64 with the ONNX graph's neighbours
# ---------------------------------------------------------------------------
class GraphMismatch(Exception):
    """The ONNX graph's kNN selections do not line up with the model's kNN calls."""


def knn_distances(x_src: Tensor, x_dst: Tensor, groups: int, position_bias) -> Tensor:
    """The group kNN's distances ``(groups, B, N_dst, N_src)`` in the inputs' precision:
    squared euclidean distances of the L2-normalised channel groups, minus the position bias
    (the quantity ``gkg_pyg.batched_group_knn`` ranks)."""
    b, n_src, c = x_src.shape

    def split(x: Tensor) -> Tensor:
        return nn.functional.normalize(x.reshape(x.shape[0], x.shape[1], groups, c // groups), dim=-1).permute(
            2, 0, 1, 3
        )

    src, dst = split(x_src), split(x_dst)
    dist = (dst * dst).sum(-1, keepdim=True) - 2 * dst @ src.transpose(-1, -2) + (src * src).sum(-1).unsqueeze(-2)
    if position_bias is not None:
        dist = dist - knn_module.dense_position_bias(position_bias).to(dist.dtype)
    return dist


def neighbour_choice(dist: Tensor, table: Tensor, dilation: int) -> tuple[int, float]:
    """How a neighbour table departs from the nearest sources by ``dist``.

    ``table`` ``(..., K * dilation)`` lists, per destination, the chosen
    sources nearest first; the model keeps ranks 0, d, 2d, .... Returns
    (destinations whose kept sources differ from the exact choice, the margin
    that explains the table: the largest |dist[table_j] - j-th smallest
    distance| over those destinations, 0 when none differs). A table that
    orders the sources by ``dist`` perturbed by at most e has a margin of at
    most 2e, so near-ties give tiny margins and another graph a large one.
    """
    needed = table.shape[-1]
    exact, order = dist.sort(dim=-1)
    kept = table[..., ::dilation].sort(dim=-1).values
    kept_exact = order[..., :needed][..., ::dilation].sort(dim=-1).values
    differ = (kept != kept_exact).any(dim=-1)
    if not bool(differ.any()):
        return 0, 0.0
    gap = (dist.gather(-1, table) - exact[..., :needed]).abs().amax(dim=-1)
    return int(differ.sum()), float(gap[differ].max())


class KnnCalls:
    """While active (``with``), every ``gkg_pyg.batched_group_knn`` call the model
    makes is recorded (its full table shape and dilation); with ``forced``
    tables (one ``(groups, B, N_dst, K * dilation)`` tensor per call, in call
    order) each call returns those neighbours instead of its own, after
    measuring them against the call's own distances (``neighbour_choice``)."""

    def __init__(self, forced: list[Tensor] | None = None) -> None:
        self.forced, self.calls = forced, []
        self.flips, self.margin = 0, 0.0
        self._original = knn_module.batched_group_knn
        self._patched: list = []

    def __enter__(self) -> "KnnCalls":
        # The models call the function through the names their modules imported.
        for name, module in list(sys.modules.items()):
            if name.startswith("gkg_pyg") and getattr(module, "batched_group_knn", None) is self._original:
                module.batched_group_knn = self
                self._patched.append(module)
        return self

    def __exit__(self, *exc) -> None:
        for module in self._patched:
            module.batched_group_knn = self._original
        self._patched = []

    def __call__(self, *args, **kwargs):
        own = self._original(*args, **kwargs)
        call = inspect.signature(self._original).bind(*args, **kwargs)
        call.apply_defaults()
        x_src, x_dst, groups, dilation = (call.arguments[k] for k in ("x_src", "x_dst", "groups", "dilation"))
        index = len(self.calls)
        full = (own.shape[0], own.shape[1], own.shape[2], call.arguments["k"] * dilation)
        self.calls.append({"shape": full, "sources": x_src.shape[1]})
        if self.forced is None:
            return own
        if index >= len(self.forced) or tuple(self.forced[index].shape) != full:
            raise GraphMismatch(f"kNN call {index + 1} of the model has no matching selection in the ONNX graph")
        table = self.forced[index].to(own.device)
        for b in range(x_src.shape[0]):  # one image at a time: (groups, N_dst, N_src) distances
            dist = knn_distances(x_src[b : b + 1], x_dst[b : b + 1], groups, call.arguments["position_bias"])
            flips, margin = neighbour_choice(dist, table[:, b : b + 1], dilation)
            self.flips, self.margin = self.flips + flips, max(self.margin, margin)
        return table[..., ::dilation].contiguous()


def load_onnx(onnx_path: Path):
    """The ONNX model in the file, or a ``CheckpointError`` naming a file that is not one."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        return onnx.load(str(onnx_path))
    except (DecodeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{onnx_path} is not an ONNX model ({str(err).splitlines()[0]})") from None


def onnx_image_size(proto) -> int | None:
    """The fixed height of the ONNX model's image input (None: not fixed, or no 4-d input)."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    if len(dims) != 4:
        return None
    return dims[2].dim_value or None


def onnx_session(proto):
    """An onnxruntime session of the ONNX model whose outputs are ``logits``,
    ``scores`` and the indices of every ``TopK`` node (the kNN selections),
    and the number of those."""
    import onnx
    import onnxruntime as ort

    if len(proto.functions):  # selections inside local functions: inline them (a new model) to reach their outputs
        from onnx import inliner

        proto = inliner.inline_local_functions(proto)
    else:  # a copy: the caller's model keeps its outputs
        proto = copy.deepcopy(proto)
    names = [node.output[1] for node in proto.graph.node if node.op_type == "TopK" and len(node.output) > 1]
    for name in names:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session, len(names)


def selections_per_call(selections: list[np.ndarray], calls: list[dict]) -> list[Tensor]:
    """The ONNX graph's selections (``TopK`` outputs in graph order, each
    ``(groups, B, rows, K * d)`` for a block of destination rows) joined into
    one table per kNN call of the model. Raises GraphMismatch when they do not
    line up: another k, dilation or number of sources, or other calls."""
    tables, i = [], 0
    for n, call in enumerate(calls, 1):
        groups, batch, rows, needed = call["shape"]
        parts, found = [], 0
        while found < rows:
            if i == len(selections):
                raise GraphMismatch(f"the ONNX graph has no kNN selection for the model's kNN call {n}")
            part = selections[i]
            i += 1
            if part.ndim != 4 or part.shape[:2] != (groups, batch) or part.shape[3] != needed:
                raise GraphMismatch(
                    f"kNN call {n} of the model picks {needed} of {call['sources']} sources (k x dilation) "
                    f"for {rows} destinations in {groups} groups, but the ONNX graph's selection {i} has shape "
                    f"{tuple(part.shape)}: not the model's graph"
                )
            parts.append(part)
            found += part.shape[2]
        if found != rows:
            raise GraphMismatch(f"the ONNX graph selects neighbours for {found} destinations in the model's kNN "
                                f"call {n}, which has {rows}")  # fmt: skip
        tables.append(torch.from_numpy(np.concatenate(parts, axis=2)).long())
    if i != len(selections):
        raise GraphMismatch(f"the ONNX graph has {len(selections) - i} kNN selections more than the model's calls")
    return tables


def compare(proto, wrapped: nn.Module, batches, topk: int, tie_margin: float = 1e-4) -> dict:
    """onnxruntime (the ONNX model ``proto``) against PyTorch in float64 run with the ONNX graph's own
    neighbours (module docstring). Returns the largest |score| and |logit|
    differences, the images whose top-k labels differ, the neighbour choices
    that depart from float64's (``flips``) with the margin explaining them,
    PyTorch float32's own distance from float64, and ``problems``: why the
    graph is not the model's (empty when it is)."""
    session, num_selections = onnx_session(proto)
    reference = copy.deepcopy(wrapped).double().eval()
    out = {"images": 0, "max_score_diff": 0.0, "max_logit_diff": 0.0, "topk_mismatch": [], "flips": 0,
           "flip_margin": 0.0, "float32_score_diff": 0.0, "same_neighbours": num_selections > 0,
           "problems": []}  # fmt: skip
    for x in batches:
        ort_logits, ort_scores, *selections = session.run(None, {"image": x.numpy()})
        with torch.no_grad():
            _, f32_scores = wrapped(x)
            with KnnCalls() as plain:
                logits, plain_scores = reference(x.double())
        scores = plain_scores
        if num_selections:
            try:
                forced = selections_per_call(selections, plain.calls)
                with torch.no_grad(), KnnCalls(forced) as chosen:
                    logits, scores = reference(x.double())
            except GraphMismatch as err:
                out["problems"].append(str(err))
                break
            out["flips"] += chosen.flips
            out["flip_margin"] = max(out["flip_margin"], chosen.margin)
        out["max_score_diff"] = max(out["max_score_diff"], float(np.abs(ort_scores - scores.numpy()).max()))
        out["max_logit_diff"] = max(out["max_logit_diff"], float(np.abs(ort_logits - logits.numpy()).max()))
        out["float32_score_diff"] = max(
            out["float32_score_diff"], float((f32_scores.double() - plain_scores).abs().max())
        )
        k = min(topk, scores.shape[1])
        ours = torch.topk(scores, k).indices.tolist()
        theirs = torch.topk(torch.from_numpy(ort_scores), k).indices.tolist()
        out["topk_mismatch"] += [out["images"] + i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
        out["images"] += x.shape[0]
    if out["flip_margin"] > tie_margin:
        out["problems"].append(
            f"the ONNX graph chose neighbours that float64 distances do not allow: a chosen source lies "
            f"{out['flip_margin']:.2e} from the exact one in distance (--tie-margin {tie_margin:g}): "
            "not the model's graph"
        )
    return out


def check_passes(result: dict, tolerance: float) -> bool:
    """The verdict on ``compare``'s result: the model's graph, and the same scores given the same neighbours."""
    return not result["problems"] and result["max_score_diff"] <= tolerance


def verify(args: argparse.Namespace) -> dict:
    """The check of an existing ONNX file (--output) against the checkpoint."""
    out = Path(args.output)
    if not out.is_file():
        raise MissingFileError(f"--verify: no ONNX file {out}")
    proto = load_onnx(out)  # read once: the input size and the check
    size = onnx_image_size(proto)
    if args.img_size is not None and size is not None and args.img_size != size:
        raise UsageError(f"--verify: {out} takes {size} x {size} images; --img-size {args.img_size} differs")
    wrapped, _, preprocess, _ = load_for_export(args)
    if size is not None:
        preprocess["img_size"] = size  # the file's input, which may differ from the checkpoint's training size
    batches = check_inputs(args.check, preprocess, args.batch_size)
    batches.append(batches[0][:1])
    result = {"onnx": str(out), **compare(proto, wrapped, batches, args.topk, args.tie_margin)}
    print(report(result, args))
    return result


def export(args: argparse.Namespace) -> dict:
    wrapped, class_names, preprocess, record = load_for_export(args)
    size = int(preprocess["img_size"])
    # A batch of at least 2 to trace with: torch.export specialises a dimension of size 1.
    example = torch.rand(max(2, args.batch_size), 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        wrapped(example)  # builds the position tables before tracing
    # Traced with its BatchNorms folded into the linear maps once (the same function): otherwise the
    # graph holds the folding's arithmetic for each of them, a third of its operations to trace and convert.
    program = torch.export.export(
        fold_batchnorms(wrapped), (example,), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    # The gkg_pyg:: operators as plain ATen operations: the ONNX exporter knows only those, and the
    # saved program then runs without gkg_pyg installed.
    program = program.run_decompositions(plain_decompositions())
    if args.torch_export:
        Path(args.torch_export).parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(program, args.torch_export)
        print(f"wrote {args.torch_export} (torch.export program)")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(program, (example,), str(out), dynamo=True, opset_version=args.opset,
                      input_names=["image"], output_names=["logits", "scores"], verbose=False)  # fmt: skip
    import onnx

    proto = onnx.load(str(out))
    meta = {"class_names": json.dumps(class_names), "preprocess": json.dumps(preprocess), "input_range": "0..1"}
    if record is not None:
        meta["thresholds"] = json.dumps(thresholds_json(record))
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(out))
    onnx.checker.check_model(str(out))
    print(f"wrote {out}: input image float32 (batch, 3, {size}, {size}) RGB 0..1, outputs logits and "
          f"scores (batch, {len(class_names)}), opset {onnx_opset(proto)}")  # fmt: skip
    result = {"onnx": str(out), "img_size": size, "num_classes": len(class_names)}
    if not args.no_check:
        batches = check_inputs(args.check, preprocess, args.batch_size)
        batches.append(batches[0][:1])  # and a batch of one: the batch dimension is dynamic
        result.update(compare(load_onnx(out), wrapped, batches, args.topk, args.tie_margin))  # the file as written
        print(report(result, args))
    return result


def report(result: dict, args: argparse.Namespace) -> str:
    """The check's findings in words."""
    if result["problems"]:
        return "onnxruntime check: " + "; ".join(result["problems"])
    how = "with the ONNX graph's neighbours" if result["same_neighbours"] else "(the ONNX graph's kNN choices unread)"
    lines = [
        f"onnxruntime vs PyTorch float64 {how} on {result['images']} images: max |score diff| "
        f"{result['max_score_diff']:.2e}, max |logit diff| {result['max_logit_diff']:.2e} (tolerance "
        f"{args.tolerance:g}), top-{args.topk} labels differ on {len(result['topk_mismatch'])} images"
    ]
    if result["same_neighbours"]:
        lines.append(
            f"near-tied kNN neighbours chosen otherwise than by float64: {result['flips']} destinations "
            f"(distances within {result['flip_margin']:.1e} of the exact choice; --tie-margin {args.tie_margin:g})"
        )
    lines.append(f"for comparison, PyTorch float32 vs float64: max |score diff| {result['float32_score_diff']:.2e}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """The command line: a user error is one line on stderr and exit status 2 (``gkg_pyg.cli.run_cli``)."""
    return run_cli(run, argv)


def run(argv=None) -> int:
    """Export (and check) as the command line says; raises on errors (``main`` reports them)."""
    args = parse_args(argv)
    result = verify(args) if args.verify else export(args)
    if not args.no_check and not check_passes(result, args.tolerance):
        print(f"check FAILED (tolerance {args.tolerance:g}, tie margin {args.tie_margin:g})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
