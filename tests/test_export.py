"""ONNX export (experiments/export.py) checked with onnxruntime against PyTorch."""

from __future__ import annotations

import contextlib
import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from gkg_pyg.builder import build_model
from gkg_pyg.config import load_config
from gkg_pyg.data import preprocess_info
from gkg_pyg.thresholds import choose_thresholds

from helpers import load_script, noise_image, run_script

# End-to-end runs of whole scripts: the quick run (-m "not slow") leaves them out.
pytestmark = pytest.mark.slow

onnx = numpy_helper = ort = None  # imported when a test of this module runs (not by a quick run's collection)


@pytest.fixture(scope="module", autouse=True)
def onnx_packages():
    global onnx, numpy_helper, ort
    onnx = pytest.importorskip("onnx")
    numpy_helper = pytest.importorskip("onnx.numpy_helper")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")


CLASSES = ["a", "b", "c", "d", "e"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A training-format checkpoint of gkgnet_ti at 40 px whose batch norms saw data (sane activations),
    with 1, 1, 3 and 1 blocks per stage (the third stage's last block at dilation 2): every kind of block
    and graph of the model, and 10 of the full model's 16 Grapher blocks to trace and convert."""
    tmp = tmp_path_factory.mktemp("export")
    cfg = load_config(None, ["model.name=gkgnet_ti", "model.img_size=40", "model.k=3", "model.drop_path=0.0",
                             "model.depths=[1,1,3,1]"])  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg, CLASSES, verbose=False)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative averages
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 40, 40))
    rng = np.random.default_rng(0)
    record = choose_thresholds(rng.random((20, 5)), (rng.random((20, 5)) < 0.4).astype(float), CLASSES)
    path = tmp / "ckpt.pth"
    torch.save({"model": model.state_dict(), "config": cfg, "class_names": CLASSES,
                "preprocess": preprocess_info(40), "thresholds": {"model": record}}, path)  # fmt: skip
    return {"tmp": tmp, "path": path, "record": record}


@pytest.fixture(scope="module")
def exported(checkpoint):
    """The command line run once: export with a check on real images, plus the torch.export program."""
    tmp = checkpoint["tmp"]
    images = []
    for i in range(3):
        noise_image(tmp / f"{i}.jpg", i)
        images.append(tmp / f"{i}.jpg")
    Image.new("RGBA", (50, 30), (10, 200, 30, 128)).save(tmp / "alpha.png")
    images.append(tmp / "alpha.png")
    out = tmp / "model.onnx"
    capture = io.StringIO()
    with contextlib.redirect_stdout(capture):
        code = run_script("export", "--checkpoint", checkpoint["path"], "--output", out, "--batch-size", "2",
                          "--check", *images, "--torch-export", tmp / "programs" / "model.pt2")  # fmt: skip
    return {"code": code, "printed": capture.getvalue(), "onnx": out, "images": images}


def test_onnx_export_matches_pytorch(checkpoint, exported):
    tmp, images, out = checkpoint["tmp"], exported["images"], exported["onnx"]
    printed = exported["printed"]
    assert exported["code"] == 0, printed
    assert "onnxruntime vs PyTorch float64 with the ONNX graph's neighbours on 5 images" in printed
    assert "top-3 labels differ on 0 images" in printed
    assert "PyTorch float32 vs float64" in printed
    assert "opset 18" in printed and [(o.domain, o.version) for o in onnx.load(str(out)).opset_import][0][1] == 18

    # The file on its own: metadata, input and outputs, against the PyTorch model with the
    # package's own preprocessing (normalisation outside, as training and predict.py do).
    proto = onnx.load(str(out))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["class_names"]) == CLASSES
    assert json.loads(meta["preprocess"])["img_size"] == 40
    thresholds = json.loads(meta["thresholds"])
    assert thresholds["global"] == pytest.approx(checkpoint["record"]["global"])
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (image_input,) = session.get_inputs()
    assert image_input.name == "image" and image_input.shape[1:] == [3, 40, 40]
    assert isinstance(image_input.shape[0], str)  # a symbolic batch dimension: any batch size runs
    assert [o.name for o in session.get_outputs()] == ["logits", "scores"]

    from gkg_pyg.data import build_test_transform, load_rgb
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    state = torch.load(checkpoint["path"], weights_only=True)
    model = build_model(state["config"], CLASSES, load_weights=False, verbose=False)
    model.load_state_dict(state["model"])
    model.eval()
    pil = [load_rgb(p) for p in images[:3]]  # batch 3: not the batch size the export was traced or checked with
    x01 = torch.stack([TF.to_tensor(TF.resize(im, [40, 40], InterpolationMode.BICUBIC)) for im in pil])
    with torch.no_grad():
        expected = torch.sigmoid(model(torch.stack([build_test_transform(40)(im) for im in pil])))
    logits, scores = session.run(None, {"image": x01.numpy()})
    # Stated tolerance: scores within 1e-4 (float32; measured about 1e-6 here), same top-3 labels.
    assert np.abs(scores - expected.numpy()).max() < 1e-4
    assert np.abs(1 / (1 + np.exp(-logits)) - scores).max() < 1e-6
    assert (np.argsort(-scores, axis=1)[:, :3] == torch.argsort(expected, dim=1, descending=True)[:, :3].numpy()).all()

    # The torch.export program (traced at batch 2, the batch dimension dynamic) gives the same
    # numbers at batches 1, 3 and 5.
    program = torch.export.load(str(tmp / "programs" / "model.pt2")).module()  # its folder made by the export
    for rows in ([0], [0, 1, 2], [0, 1, 2, 0, 1]):
        with torch.no_grad():
            _, ep_scores = program(x01[rows])
        assert torch.allclose(ep_scores, expected[rows], atol=1e-5), rows


def test_the_check_fails_on_a_wrong_graph(checkpoint, exported, tmp_path, capsys):
    """The check can fail: one weight changed in the file, or a model whose kNN takes another k."""
    exporter = load_script("export")
    # One weight of the patch head changed in the ONNX file: exit status 1.
    proto = onnx.load(str(exported["onnx"]))
    (head,) = [t for t in proto.graph.initializer if t.name.endswith("head_patch.weight")]
    values = numpy_helper.to_array(head).copy()
    values.flat[0] += 1.0
    head.CopyFrom(numpy_helper.from_array(values, head.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, str(broken))
    assert run_script("export", "--checkpoint", checkpoint["path"], "--output", broken, "--verify") == 1
    printed = capsys.readouterr()
    assert "check FAILED" in printed.err
    score_diff = float(re.search(r"max \|score diff\| (\S+),", printed.out).group(1))
    assert score_diff > 1e-3
    # The unchanged file passes the same verification.
    assert run_script("export", "--checkpoint", checkpoint["path"], "--output", exported["onnx"], "--verify") == 0
    capsys.readouterr()

    # The same weights with k = 4 in every kNN: the ONNX graph (k = 3) is not this model's graph.
    args = exporter.parse_args(["--checkpoint", str(checkpoint["path"]), "--output", str(exported["onnx"])])
    wrapped, _, preprocess, _ = exporter.load_for_export(args)
    for module in wrapped.modules():
        if hasattr(module, "k") and isinstance(module.k, int):
            module.k = 4
    batches = exporter.check_inputs([], preprocess, 2)
    result = exporter.compare(exporter.load_onnx(exported["onnx"]), wrapped, batches, 3)
    assert not exporter.check_passes(result, 1e-4)
    assert "picks 4 of" in result["problems"][0] and "not the model's graph" in result["problems"][0]


def test_paths_and_files_that_cannot_be_exported_or_verified(checkpoint, exported, tmp_path, capsys):
    """One error line and status 2, before any export: a folder as --output or --torch-export, a
    --verify file that is not ONNX, a --verify --img-size other than the file's."""
    folder = tmp_path / "out"
    folder.mkdir()
    ckpt = checkpoint["path"]
    assert run_script("export", "--checkpoint", ckpt, "--output", folder, "--no-check") == 2
    assert f"error: --output {folder} is a folder" in capsys.readouterr().err
    assert run_script("export", "--checkpoint", ckpt, "--output", tmp_path / "m.onnx", "--torch-export", folder) == 2
    assert f"error: --torch-export {folder} is a folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [folder] and not list(folder.iterdir())  # nothing written
    text = tmp_path / "text.onnx"
    text.write_text("hello")
    assert run_script("export", "--checkpoint", ckpt, "--output", text, "--verify") == 2
    assert f"error: {text} is not an ONNX model" in capsys.readouterr().err
    assert run_script("export", "--checkpoint", ckpt, "--output", exported["onnx"], "--verify", "--img-size", "48") == 2
    assert "takes 40 x 40 images; --img-size 48 differs" in capsys.readouterr().err


def test_neighbour_choices_within_the_tie_margin_only():
    """neighbour_choice: a swap of two near-tied sources is measured by their distance gap; a far
    source in the table by its own distance from the exact choice; the same kept set is no departure."""
    exporter = load_script("export")
    dist = torch.tensor([[[[0.10, 0.30, 0.300001, 0.50, 0.90]]]], dtype=torch.float64)  # (groups, B, dst, src)
    exact = torch.tensor([[[[0, 1, 2]]]])
    assert exporter.neighbour_choice(dist, exact, 1) == (0, 0.0)
    reordered = torch.tensor([[[[1, 0, 2]]]])  # same set, other order: max aggregation cannot tell
    assert exporter.neighbour_choice(dist, reordered, 1) == (0, 0.0)
    near = torch.tensor([[[[0, 2, 1]]]])  # with dilation 2 the kept ranks 0 and 2 are {0, 1}, not {0, 2}
    flips, margin = exporter.neighbour_choice(dist, near, 2)
    assert flips == 1 and margin == pytest.approx(1e-6)
    far = torch.tensor([[[[0, 1, 4]]]])  # the 0.9 source instead of 0.300001
    flips, margin = exporter.neighbour_choice(dist, far, 1)
    assert flips == 1 and margin == pytest.approx(0.599999)


def test_a_near_tie_chosen_otherwise_changes_scores_but_passes(checkpoint):
    """Float32 runtimes may order a near-tied pair of sources either way. Swapping, in float64, the
    closest pair at the edge of one destination's neighbours (in the last kNN call, so that no later
    call sees other features) moves the scores, is measured at the size of its distance gap, and the
    reference run with those neighbours follows them exactly."""
    exporter = load_script("export")
    args = exporter.parse_args(["--checkpoint", str(checkpoint["path"]), "--output", "unused.onnx"])
    wrapped, _, _, _ = exporter.load_for_export(args)
    reference = wrapped.double()
    x = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    class FullTables(exporter.KnnCalls):
        """Records each call's float64 distances and its full K * d table (what an exported TopK gives)."""

        def __call__(self, x_src, x_dst, k, groups, *, dilation=1, position_bias=None, backend="auto"):
            dist = exporter.knn_distances(x_src, x_dst, groups, position_bias)
            self.full.append((dist, dist.topk(k * dilation, dim=-1, largest=False).indices))
            return super().__call__(x_src, x_dst, k, groups, dilation=dilation, position_bias=position_bias,
                                    backend=backend)  # fmt: skip

    with torch.no_grad(), FullTables() as recorder:
        recorder.full = []
        _, plain = reference(x)
    dist, table = recorder.full[-1]
    assert recorder.calls[-1]["shape"] == tuple(table.shape) and len(recorder.calls) == len(recorder.full)
    tables = [t.clone() for _, t in recorder.full]
    with torch.no_grad(), exporter.KnnCalls(tables) as same:
        _, again = reference(x)
    assert same.flips == 0 and torch.allclose(again, plain, rtol=0, atol=1e-12)

    k = table.shape[-1]
    assert k == wrapped.model.k  # dilation 1 there: every one of the k nearest is kept
    ordered, order = dist.sort(dim=-1)
    gaps = ordered[..., k] - ordered[..., k - 1]
    g, b, d = np.unravel_index(int(gaps.flatten().argmin()), tuple(gaps.shape))
    tables[-1][g, b, d, k - 1] = order[g, b, d, k]  # the (k+1)-th source instead of the k-th
    with torch.no_grad(), exporter.KnnCalls(tables) as swapped:
        _, moved = reference(x)
    assert swapped.flips == 1 and swapped.margin == pytest.approx(float(gaps[g, b, d]), rel=1e-6, abs=1e-15)
    assert float((moved - plain).abs().max()) > 1e-9  # one neighbour changes the scores
    with torch.no_grad(), exporter.KnnCalls(tables):
        _, moved_again = reference(x)
    assert torch.equal(moved_again, moved)


def test_an_opset_the_exporter_would_raise_is_refused():
    """torch.onnx's exporter writes opset 18 at least: --opset 9 would silently become 18."""
    with pytest.raises(ValueError, match="--opset must be 18 or later"):
        load_script("export").parse_args(["--checkpoint", "c.pth", "--output", "m.onnx", "--opset", "9"])
