"""Checkpoint loading in the three layouts, export and refusal of misfits."""

import logging

import pytest
import torch
import torch.nn.functional as F

import gkg_pyg
from gkg_pyg.models.convert import detect_layout


def small_model(num_classes=5, img_size=96, seed=0, **kw):
    torch.manual_seed(seed)
    return gkg_pyg.create_model("gkgnet_ti", num_classes=num_classes, img_size=img_size, **kw).eval()


def perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_var.uniform_(0.5, 1.5)
    return model


def test_export_and_reload_authors_layout_round_trip(tmp_path):
    src = perturbed(small_model())
    path = tmp_path / "gkgnet_mmcls.pth"
    ckpt = gkg_pyg.export_authors_checkpoint(src, path)
    assert ckpt["state_dict"]["backbone.backbone.0.0.graph_conv.gconv.nn.0.weight"].shape == (96, 24, 1, 1)
    assert "backbone.backbone.0.0.relative_pos" in ckpt["state_dict"]
    dst = small_model(seed=1)
    report = gkg_pyg.load_checkpoint(dst, str(path), verbose=False)
    assert report["source"] == "gkgnet_mmcls"
    assert report["missing"] == []
    assert all(k.endswith("relative_pos") for k in report["skipped"]) and len(report["skipped"]) == 12
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


def test_mmcv_meta_with_numpy_scalars_loads(tmp_path):
    """mmcv's hooks keep NumPy scalars in a checkpoint's meta (the evaluation hook's best_score): the
    weights-only loader takes them, and the weights load as from a plain file."""
    import numpy as np

    src = perturbed(small_model())
    ckpt = gkg_pyg.export_authors_checkpoint(src, tmp_path / "plain.pth")
    meta = {"hook_msgs": {"best_score": np.float64(0.8765), "last_ckpt": "epoch_40.pth"}, "epoch": np.int64(40),
            "seed": np.int32(0), "flag": np.bool_(True), "CLASSES": ["a", "b"]}  # fmt: skip
    torch.save({"meta": meta, "state_dict": ckpt["state_dict"]}, tmp_path / "mmcv.pth")
    dst = small_model(seed=1)
    assert gkg_pyg.load_checkpoint(dst, str(tmp_path / "mmcv.pth"), verbose=False)["missing"] == []
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


def test_malformed_img_size_and_reset_classifier_keeps_the_mode():
    for bad in ((100,), 96.0, "96", (96, 96, 3)):
        with pytest.raises(gkg_pyg.errors.ConfigError, match="img_size must be an int or"):
            gkg_pyg.create_model("gkgnet_ti", num_classes=5, img_size=bad)
    for name in ("gkgnet_ti", "pvig_ti"):
        model = gkg_pyg.create_model(name, num_classes=5, img_size=96).eval()
        model.reset_classifier(7)
        assert not any(m.training for m in model.modules()), name


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])  # DDP, torch.compile, both
def test_own_layout_under_model_key_with_a_wrapper_prefix(prefix):
    src = perturbed(small_model())
    state = {"model": {f"{prefix}{k}": v for k, v in src.state_dict().items()}, "epoch": 3}
    dst = small_model(seed=1)
    report = gkg_pyg.load_checkpoint(dst, state, verbose=False)
    assert report["source"] == "gkg_pyg" and report["missing"] == [] and report["skipped"] == []
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


def pyramid_vig_state(model, pos_grid=(56, 56)):
    """An ImageNet Pyramid ViG checkpoint in its own layout, made from ``model``."""
    authors = gkg_pyg.export_authors_checkpoint(model)["state_dict"]
    state = {
        k[len("backbone.") :]: v
        for k, v in authors.items()
        if k.startswith("backbone.")
        and not k.startswith(("backbone.label_lt", "backbone.gcn_label", "backbone.ffn_label"))
    }
    state["pos_embed"] = torch.randn(1, state["pos_embed"].shape[1], *pos_grid)
    state["prediction.0.weight"] = torch.randn(1024, 384, 1, 1)
    state["prediction.4.weight"] = torch.randn(1000, 1024, 1, 1)
    return {"state_dict": state}


def test_pyramid_vig_loads_patch_path_and_resizes_position_embedding(caplog):
    src = perturbed(small_model())
    ckpt = pyramid_vig_state(src)
    assert detect_layout(ckpt["state_dict"]) == "pyramid_vig"
    dst = small_model(seed=1)
    before_head = dst.head_patch.weight.clone()
    with caplog.at_level(logging.INFO, logger="gkg_pyg.checkpoint"):
        report = gkg_pyg.load_checkpoint(dst, ckpt)
    printed = caplog.text
    assert "pyramid_vig" in printed and "missing" in printed
    assert report["source"] == "pyramid_vig"
    assert "prediction.0.weight" in report["skipped"] and "prediction.4.weight" in report["skipped"]
    assert any(k.startswith("label_modules.") for k in report["missing"])
    assert "head_patch.weight" in report["missing"] and torch.equal(dst.head_patch.weight, before_head)
    assert report["resized"]
    expected = F.interpolate(ckpt["state_dict"]["pos_embed"], size=(24, 24), mode="bicubic", align_corners=False)
    assert torch.allclose(dst.pos_embed, expected)
    for name, p in src.stages.named_parameters():
        assert torch.equal(p, dict(dst.stages.named_parameters())[name]), name


def test_misfit_checkpoint_is_refused_and_model_untouched():
    src = small_model(num_classes=7)
    dst = small_model(num_classes=5, seed=1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError, match=r"'backbone.label_lt.weight' has shape \(7, 48\).*\(5, 48\)"):
        gkg_pyg.load_checkpoint(dst, gkg_pyg.export_authors_checkpoint(src))
    with pytest.raises(ValueError, match=r"'label_embed.weight' has shape \(7, 48\)"):
        gkg_pyg.load_checkpoint(dst, src.state_dict())
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def test_bad_inputs(tmp_path):
    model = small_model()
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        gkg_pyg.load_checkpoint(model, str(tmp_path / "nowhere.pth"))
    with pytest.raises(ValueError, match="unknown checkpoint source"):
        gkg_pyg.load_checkpoint(model, model.state_dict(), source="timm")
    with pytest.raises(ValueError, match="cannot tell the checkpoint layout"):
        gkg_pyg.load_checkpoint(model, {"encoder.weight": torch.zeros(2)})
