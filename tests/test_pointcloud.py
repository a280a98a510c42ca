"""The synthetic point-cloud data set, the ModelNet wrapper (on a miniature
ModelNet in its real OFF layout) and experiments/pointcloud.py (its graphs and
EdgeConv layer against brute force, and a tiny end-to-end run)."""

import json
import math

import pytest
import torch

from gkg_pyg.data.pointcloud import MODELNET10_CLASSES, SHAPE_CLASSES, SyntheticShapes, load_modelnet, sample_shape

from helpers import load_script

torch_cluster = pytest.importorskip("torch_cluster")  # the experiment's kNN graphs need it


def test_shapes_lie_on_their_surfaces():
    gen = torch.Generator().manual_seed(0)
    surfaces = {  # implicit equation of each canonical shape, 0 on the surface
        "sphere": lambda p: p.norm(dim=1) - 1,
        "cube": lambda p: p.abs().max(dim=1).values - 1,
        "octahedron": lambda p: p.abs().sum(dim=1) - 1,
        "torus": lambda p: ((p[:, :2].norm(dim=1) - 1) ** 2 + p[:, 2] ** 2).sqrt() - 0.4,
    }
    for name, surface in surfaces.items():
        pts = sample_shape(SHAPE_CLASSES.index(name), 500, gen)
        assert pts.shape == (500, 3) and surface(pts).abs().max() < 1e-9, name
    cyl = sample_shape(SHAPE_CLASSES.index("cylinder"), 2000, gen)
    radial, z = cyl[:, :2].norm(dim=1), cyl[:, 2]
    on_side, on_cap = (radial - 1).abs() < 1e-9, (z.abs() - 1).abs() < 1e-9
    assert (on_side | on_cap).all() and (radial <= 1 + 1e-9).all()
    assert 0.6 < on_side.float().mean() < 0.74  # lateral share of the area: 4 pi / 6 pi
    cone = sample_shape(SHAPE_CLASSES.index("cone"), 2000, gen)
    radial, z = cone[:, :2].norm(dim=1), cone[:, 2]
    assert ((radial - (1 - z) / 2).abs().lt(1e-9) | (z + 1).abs().lt(1e-9)).all()
    bumpy = sample_shape(SHAPE_CLASSES.index("bumpy_sphere"), 2000, gen).norm(dim=1)
    assert bumpy.min() < 0.95 and bumpy.max() > 1.05 and (bumpy - 1).abs().max() <= 0.15 + 1e-9
    wavy = sample_shape(SHAPE_CLASSES.index("wavy_torus"), 2000, gen)
    tube = ((wavy[:, :2].norm(dim=1) - 1) ** 2 + wavy[:, 2] ** 2).sqrt()
    phi = torch.atan2(wavy[:, 1], wavy[:, 0])
    assert torch.allclose(tube, 0.4 * (1 + 0.3 * torch.sin(6 * phi)), atol=1e-9)


def test_synthetic_shapes_data_set():
    train = SyntheticShapes("train", num_per_class=3, num_points=64, noise=0.02, seed=5)
    again = SyntheticShapes("train", num_per_class=3, num_points=64, noise=0.02, seed=5)
    test = SyntheticShapes("test", num_per_class=3, num_points=64, noise=0.02, seed=5)
    assert len(train) == 24 and train.num_classes == len(SHAPE_CLASSES) == 8
    assert torch.bincount(torch.cat([d.y for d in train.data])).tolist() == [3] * 8
    for d in train.data:
        assert d.pos.shape == (64, 3) and d.pos.dtype == torch.float32
        assert d.pos.mean(0).abs().max() < 1e-5 and abs(d.pos.norm(dim=1).max() - 1) < 1e-5  # NormalizeScale
    assert all(torch.equal(a.pos, b.pos) for a, b in zip(train.data, again.data))
    assert not torch.equal(train[0].pos, test[0].pos)
    with pytest.raises(ValueError, match="split"):
        SyntheticShapes("val")


def test_knn_graph_and_edgeconv_against_brute_force():
    script = load_script("pointcloud")
    torch.manual_seed(0)
    pos = torch.randn(30, 3, dtype=torch.float64)
    batch = torch.tensor([0] * 12 + [1] * 18)
    k = 4
    src, dst = script.knn_graph(pos, k, batch)
    for i in range(30):
        same = (batch == batch[i]).nonzero().flatten()
        nearest = same[torch.cdist(pos[i : i + 1], pos[same])[0].argsort()[:k]]
        assert sorted(src[dst == i].tolist()) == sorted(nearest.tolist())  # itself included, own cloud only
    model = script.DGCNN(num_classes=5, variant="edgeconv", k=k).double().eval()
    x1 = model.conv1(pos, script.knn_graph(pos, k, batch))
    for i in (0, 17):
        nbrs = src[dst == i]
        edge = torch.cat([pos[i].expand(k, 3), pos[nbrs] - pos[i]], dim=1)  # EdgeConv: h([x_i, x_j - x_i])
        assert torch.allclose(x1[i], model.conv1.nn(edge).max(dim=0).values)


@pytest.mark.parametrize("variant", ["edgeconv", "maxrel_g1", "maxrel_g2"])
def test_dgcnn_variants_forward_and_train(variant):
    script = load_script("pointcloud")
    torch.manual_seed(0)
    data = SyntheticShapes("train", num_per_class=1, num_points=40)
    from torch_geometric.loader import DataLoader

    batch = next(iter(DataLoader(data, batch_size=8)))
    model = script.DGCNN(8, variant, k=6)
    out = model(batch.pos, batch.batch)
    assert out.shape == (8, 8)
    torch.nn.functional.cross_entropy(out, batch.y).backward()
    assert all(p.grad is not None for p in model.parameters())
    if variant != "edgeconv":
        assert model.conv2.groups == int(variant[-1]) and model.conv1.groups == 1


def test_script_runs_end_to_end(tmp_path, capsys):
    script = load_script("pointcloud")
    out = tmp_path / "runs.json"
    rows = script.run(
        [
            "--variants",
            "edgeconv,maxrel_g2",
            "--seeds",
            "0",
            "1",
            "--epochs",
            "1",
            "--k",
            "4",
            "--num-points",
            "32",
            "--per-class",
            "2",
            "--test-per-class",
            "1",
            "--out",
            str(out),
        ]
    )
    assert [r["variant"] for r in rows] == ["edgeconv", "maxrel_g2"]
    for r in rows:
        assert len(r["accuracy"]) == 2 and all(0 <= a <= 100 for a in r["accuracy"])
        assert r["seconds_per_epoch"] > 0 and r["parameters"] > 0
        assert math.isclose(r["mean"], sum(r["accuracy"]) / 2)
    saved = json.loads(out.read_text())
    assert len(saved["runs"]) == 4 and saved["summary"][0]["variant"] == "edgeconv"
    assert "| variant | parameters |" in capsys.readouterr().out
    capsys.readouterr()
    assert script.main(["--variants", "edgeconv,nope"]) == 2  # one line, argparse's exit status
    assert capsys.readouterr().err.startswith("error: unknown variant(s) ['nope']")
    for bad, message in ((["--per-class", "0"], "--per-class and --test-per-class must be positive"),
                         (["--noise", "-1"], "--noise must be >= 0"), (["--lr", "nan"], "--lr > 0")):  # fmt: skip
        assert script.main(bad) == 2
        assert message in capsys.readouterr().err


def write_modelnet(root):
    """A miniature ModelNet10 in the real layout: raw/<class>/{train,test}/<class>_NNNN.off (a tetrahedron)."""
    off = "OFF\n4 4 0\n0 0 0\n1 0 0\n0 1 0\n0 0 1\n3 0 1 2\n3 0 1 3\n3 0 2 3\n3 1 2 3\n"
    for c in MODELNET10_CLASSES:
        for split, n in (("train", 2), ("test", 1)):
            folder = root / "raw" / c / split
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / f"{c}_{i + 1:04d}.off").write_text(off)


def test_modelnet_loader_on_the_real_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded"):
        load_modelnet(tmp_path / "ModelNet10", "10")
    write_modelnet(tmp_path / "ModelNet10")
    train = load_modelnet(tmp_path / "ModelNet10", "10", train=True, num_points=50)
    test = load_modelnet(tmp_path / "ModelNet10", "10", train=False, num_points=50)
    assert len(train) == 20 and len(test) == 10 and train.num_classes == 10
    sample = train[0]
    assert sample.pos.shape == (50, 3) and sample.pos.abs().max() <= 1 + 1e-5  # NormalizeScale: within [-1, 1]
    with pytest.raises(ValueError, match="'10' or '40'"):
        load_modelnet(tmp_path / "ModelNet10", "20")
