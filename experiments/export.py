"""Export a trained GKGNet to ONNX (and torch.export) at a fixed input size
and any batch size, and check the exported model against PyTorch.

    python experiments/export.py --checkpoint runs/demo/checkpoint_best.pth --output demo.onnx
    python experiments/export.py --checkpoint CKPT --output model.onnx --batch-size 8 --check img1.jpg img2.jpg
    python experiments/export.py --checkpoint CKPT --output model.onnx --torch-export model.pt2

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
deterministic random inputs) and the script reports the largest score
difference and whether the top-k labels agree; it fails (exit status 1)
when the scores differ by more than --tolerance (default 1e-4) or the
top-k labels of an image differ. In float32 a near-tie between two kNN
distances can be ordered differently by two runtimes and change a
neighbour: a larger difference on a real image is that, not a broken
export. ``torch.onnx.export(dynamo=True)``, which goes through
``torch.export``, is used; --torch-export also saves that program.
Needs the optional extra: ``pip install -e .[export]`` (onnx,
onnxruntime, onnxscript).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from gkg_pyg.builder import load_trained_model  # noqa: E402
from gkg_pyg.data import checkpoint_preprocess, load_rgb  # noqa: E402
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="trained weights")
    p.add_argument("--output", required=True, help="the ONNX file to write")
    p.add_argument("--config", help="YAML config (default: the one saved in the checkpoint)")
    p.add_argument("--ema", action="store_true", help="export the checkpoint's EMA weights")
    p.add_argument("--img-size", type=int, help="input size (default: the checkpoint's)")
    p.add_argument(
        "--batch-size", type=int, default=2, help="batch size of the check runs (the exported graph takes any)"
    )
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--torch-export", metavar="PATH", help="also save the torch.export program (.pt2)")
    p.add_argument("--check", nargs="*", default=[], metavar="IMAGE", help="images for the onnxruntime check")
    p.add_argument("--topk", type=int, default=3, help="top-k labels compared in the check")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed score difference in the check")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime check")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    return args


def load_for_export(args: argparse.Namespace):
    """(wrapped model in eval mode on the dense kNN path, class names, preprocess, thresholds record)."""
    model, class_names, cfg, checkpoint = load_trained_model(args.checkpoint, args.config, args.ema)
    if cfg.get("task") == "single_label":
        raise ValueError(
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


def compare(onnx_path: Path, wrapped: nn.Module, batches, topk: int) -> dict:
    """Largest |score| and |logit| differences between onnxruntime and PyTorch,
    and the images whose top-k label lists differ."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst_score, worst_logit, mismatched, n = 0.0, 0.0, [], 0
    for x in batches:
        with torch.no_grad():
            logits, scores = wrapped(x)
        ort_logits, ort_scores = session.run(["logits", "scores"], {"image": x.numpy()})
        worst_score = max(worst_score, float(np.abs(ort_scores - scores.numpy()).max()))
        worst_logit = max(worst_logit, float(np.abs(ort_logits - logits.numpy()).max()))
        k = min(topk, scores.shape[1])
        ours = torch.topk(scores, k).indices.tolist()
        theirs = torch.topk(torch.from_numpy(ort_scores), k).indices.tolist()
        mismatched += [n + i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
        n += x.shape[0]
    return {"images": n, "max_score_diff": worst_score, "max_logit_diff": worst_logit, "topk_mismatch": mismatched}


def export(args: argparse.Namespace) -> dict:
    wrapped, class_names, preprocess, record = load_for_export(args)
    size = int(preprocess["img_size"])
    # A batch of at least 2 to trace with: torch.export specialises a dimension of size 1.
    example = torch.rand(max(2, args.batch_size), 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        wrapped(example)  # builds the position tables before tracing
    program = torch.export.export(wrapped, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    if args.torch_export:
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
          f"scores (batch, {len(class_names)}), opset {args.opset}")  # fmt: skip
    result = {"onnx": str(out), "img_size": size, "num_classes": len(class_names)}
    if not args.no_check:
        batches = check_inputs(args.check, preprocess, args.batch_size)
        batches.append(batches[0][:1])  # and a batch of one: the batch dimension is dynamic
        result.update(compare(out, wrapped, batches, args.topk))
        print(f"onnxruntime vs PyTorch on {result['images']} images: max |score diff| {result['max_score_diff']:.2e}, "
              f"max |logit diff| {result['max_logit_diff']:.2e}, top-{args.topk} labels differ on "
              f"{len(result['topk_mismatch'])} images")  # fmt: skip
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    result = export(args)
    if not args.no_check and (result["max_score_diff"] > args.tolerance or result["topk_mismatch"]):
        print(f"check FAILED (tolerance {args.tolerance})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
