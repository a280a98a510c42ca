"""ONNX export (experiments/export.py) checked with onnxruntime against PyTorch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from gkg_pyg.builder import build_model
from gkg_pyg.config import load_config
from gkg_pyg.data import preprocess_info
from gkg_pyg.thresholds import choose_thresholds

from test_formats import noise_image, run_script

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

CLASSES = ["a", "b", "c", "d", "e"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A training-format checkpoint of gkgnet_ti at 40 px whose batch norms saw data (sane activations)."""
    tmp = tmp_path_factory.mktemp("export")
    cfg = load_config(None, ["model.name=gkgnet_ti", "model.img_size=40", "model.k=3", "model.drop_path=0.0"])
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


def test_onnx_export_matches_pytorch(checkpoint, capsys):
    tmp = checkpoint["tmp"]
    images = []
    for i in range(3):
        noise_image(tmp / f"{i}.jpg", i)
        images.append(tmp / f"{i}.jpg")
    Image.new("RGBA", (50, 30), (10, 200, 30, 128)).save(tmp / "alpha.png")
    images.append(tmp / "alpha.png")
    out = tmp / "model.onnx"
    code = run_script("export", "--checkpoint", checkpoint["path"], "--output", out, "--batch-size", "2",
                      "--check", *images, "--torch-export", tmp / "model.pt2")  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "top-3 labels differ on 0 images" in printed

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

    # The torch.export program gives the same numbers.
    program = torch.export.load(str(tmp / "model.pt2"))
    with torch.no_grad():
        _, ep_scores = program.module()(x01)
    assert torch.allclose(ep_scores, expected, atol=1e-5)


def test_torch_export_takes_any_batch_size():
    """Traced once with a dynamic batch dimension (batch 2), the program equals
    the eager model at other batch sizes (float64, so that near-ties of kNN
    distances cannot hide a difference), also with several dense-kNN blocks
    of images in eager mode."""
    from gkg_pyg import create_model
    from gkg_pyg import knn as knn_module

    torch.manual_seed(0)
    model = create_model("gkgnet_ti", num_classes=5, img_size=96).double().eval()
    example = torch.rand(2, 3, 96, 96, dtype=torch.float64)
    with torch.no_grad():
        model(example)  # position tables, built outside the trace
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    for batch in (1, 3, 5):
        x = torch.rand(batch, 3, 96, 96, dtype=torch.float64)
        with torch.no_grad():
            want = model(x)
            torch.testing.assert_close(program(x), want, rtol=1e-9, atol=1e-9)
    # Eager blocks of one image per distance block give the same logits as well.
    original = knn_module.DENSE_BLOCK_ELEMENTS
    try:
        knn_module.DENSE_BLOCK_ELEMENTS = 1
        with torch.no_grad():
            torch.testing.assert_close(model(x), want, rtol=0, atol=0)
    finally:
        knn_module.DENSE_BLOCK_ELEMENTS = original
