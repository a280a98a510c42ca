"""Tests of gkg_pyg.inspect, experiments/inspect_graphs.py (CLI), the HTML viewer
(in headless Chromium) and experiments/inspect_graphs.ipynb (executed)."""

import copy
import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import gkg_pyg
from gkg_pyg import inspect as gi
from gkg_pyg.data import SYNTHETIC_CLASSES, build_test_transform, make_synthetic_coco
from gkg_pyg.errors import UsageError

from helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
IMG_SIZE = 128  # every stage then has more than K patches (stage 4: 4x4)
NAMES = ["bottle", "car", "bird", "dog"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread here and in the notebook's kernel: these tiny models gain
    nothing from a second thread, and on a busy 2-core machine OpenMP's waiting
    threads slow every operator down many times."""
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if env is None:
        del os.environ["OMP_NUM_THREADS"]
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return gkg_pyg.create_model("gkgnet_ti", num_classes=len(NAMES), img_size=IMG_SIZE, class_names=NAMES)


@pytest.fixture(scope="module")
def pil_image():
    rng = np.random.default_rng(0)
    # A smooth gradient plus noise at another size than the model's (the transform resizes).
    yy, xx = np.mgrid[0:150, 0:170]
    pixels = np.stack([xx * 1.5, yy * 1.7, (xx + yy) * 0.8], -1) + rng.normal(0, 20, (150, 170, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def captured(model, pil_image):
    return gi.capture_graphs(model, pil_image, note=gi.RANDOM_WEIGHTS_NOTE)


def edges_into(data, src, dst, index, groups):
    """Per group, the sources of destination ``index``, read straight from edge_index."""
    out = []
    for g in range(groups):
        ei = data[src, f"group_{g}", dst].edge_index
        out.append(ei[0, ei[1] == index].tolist())
    return out


# ---------------------------------------------------------------------------
# capture_graphs
# ---------------------------------------------------------------------------
def test_capture_is_one_pass_and_leaves_model_outputs_alone(model, pil_image):
    x = build_test_transform(IMG_SIZE)(pil_image)
    calls = []
    hook = model.register_forward_hook(lambda *args: calls.append(1))
    model.train()
    bn = model.stages[0].blocks[0]["grapher"].fc1[1]
    running = bn.running_mean.clone()
    try:
        cap = gi.capture_graphs(model, pil_image)
    finally:
        hook.remove()
    assert calls == [1]
    assert model.training  # flag restored
    assert torch.equal(bn.running_mean, running)  # ran in eval mode
    model.eval()
    with torch.no_grad():
        logits = model(x[None])[0]
    assert torch.equal(cap.logits, logits)
    torch.testing.assert_close(cap.scores, logits.sigmoid())
    assert torch.equal(cap.tensor, x)
    assert cap.image.dtype == np.uint8 and cap.image.shape == (IMG_SIZE, IMG_SIZE, 3)
    assert cap.class_names == NAMES and cap.graph(1)["label"].name == NAMES
    assert (cap.k, cap.groups, cap.num_stages) == (9, 2, 4)
    # A path and a tensor give the same capture as the PIL image.
    assert torch.equal(gi.capture_graphs(model, x).logits, cap.logits)


def test_capture_from_path_and_default_names(tmp_path, pil_image):
    torch.manual_seed(1)
    unnamed = gkg_pyg.create_model("gkgnet_ti", num_classes=3, img_size=96)
    path = tmp_path / "image.png"
    pil_image.save(path)
    cap = gi.capture_graphs(unnamed, str(path))
    assert cap.class_names == ["label_0", "label_1", "label_2"]
    assert torch.equal(cap.tensor, build_test_transform(96)(pil_image))
    # The drawing image is the model input de-normalised.
    expect = np.asarray(pil_image.resize((96, 96), Image.BICUBIC))
    assert np.abs(cap.image.astype(int) - expect.astype(int)).max() <= 2
    with pytest.raises(ValueError, match="2 class names"):
        gi.capture_graphs(unnamed, cap.tensor, class_names=["a", "b"])
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        gi.capture_graphs(unnamed, torch.zeros(1, 96, 96))
    # Raw pixels: cast to float they would pass for normalised values (and give other scores).
    with pytest.raises(ValueError, match=r"floating-point image, normalised .* got torch.uint8"):
        gi.capture_graphs(unnamed, torch.from_numpy(np.asarray(pil_image.resize((96, 96)))).permute(2, 0, 1))


def brute_force_knn(src, dst, k, groups, dilation=1, bias=None):
    """Distances ``(G, N_dst, N_src)`` and the kept ranks ``(G, N_dst, k)`` by plain torch:
    cosine distance of each group's normalised chunks, minus the bias, sorted."""
    c = src.shape[1] // groups
    dist = []
    for g in range(groups):
        s = F.normalize(src[:, g * c : (g + 1) * c].double(), dim=1)
        d = F.normalize(dst[:, g * c : (g + 1) * c].double(), dim=1)
        dg = ((d[:, None, :] - s[None, :, :]) ** 2).sum(-1)
        dist.append(dg if bias is None else dg - bias.double())
    dist = torch.stack(dist)
    return dist, dist.argsort(dim=-1, stable=True)[..., : k * dilation : dilation]


def assert_same_neighbours(dist, table, expect):
    # Near-ties may swap ranks between float32 and float64: compare the
    # distances at every kept rank, and require that nearly all indices agree.
    torch.testing.assert_close(dist.gather(-1, table), dist.gather(-1, expect), atol=1e-4, rtol=0)
    assert (table == expect).float().mean() > 0.97
    assert all(len(set(row)) == row.numel() for row in table.reshape(-1, table.shape[-1]))


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_graphs_agree_with_recomputed_knn(model, captured, stage):
    data = captured.graph(stage)
    block = model.stages[stage - 1]
    grid = data["patch"].grid
    assert isinstance(grid, tuple)  # usable as position_bias's cache key
    dst = data["patch"].knn_x
    if block.pool > 1:
        src = data["pooled_patch"].x
        pooled = F.avg_pool2d(dst.t().reshape(1, -1, *grid), block.pool).flatten(2)[0].t()
        torch.testing.assert_close(src, pooled)  # the stored sources are the pooled knn features
    else:
        assert "pooled_patch" not in data.node_types
        src = dst
    dilation = max(1, min(block.dilations[-1], src.shape[0] // model.k))
    dist, expect = brute_force_knn(src, dst, model.k, model.groups, dilation, block.position_bias(grid))
    assert_same_neighbours(dist, gi.patch_neighbours(captured, stage), expect)
    # Cross-level: label features vs the stage's patch features, no bias, no dilation.
    dist, expect = brute_force_knn(data["patch"].x, data["label"].x, model.k, model.groups)
    assert_same_neighbours(dist, gi.label_neighbours(captured, stage), expect)


# ---------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------
def test_distinct_counts_brute_force():
    gen = torch.Generator().manual_seed(0)
    table = torch.randint(0, 12, (3, 50, 5), generator=gen)
    expect = [len(set(table[:, i].flatten().tolist())) for i in range(50)]
    assert gi.distinct_counts(table).tolist() == expect


@pytest.mark.parametrize("stage", [1, 3])
def test_label_summaries_match_edges(captured, stage):
    data = captured.graph(stage)
    k, g = captured.k, captured.groups
    pos = data["patch"].pos.tolist()
    for label in range(len(NAMES)):
        s = gi.label_summary(captured, NAMES[label], stage)
        per_group = edges_into(data, "patch", "label", label, g)
        assert s.neighbours == [[tuple(pos[i]) for i in idx] for idx in per_group]
        union = set().union(*map(set, per_group))
        assert k <= s.distinct <= k * g and s.distinct == len(union)
        assert s.shared == sum(sum(i in set(idx) for idx in per_group) > 1 for i in union)
        assert s.overlap == [[len(set(a) & set(b)) for b in per_group] for a in per_group]
        assert s.score == pytest.approx(float(captured.scores[label]))
    assert len(gi.summarize_labels(captured)) == 4 * len(NAMES)
    with pytest.raises(ValueError, match="unknown label"):
        gi.label_summary(captured, "zebra", stage)
    for not_a_label in (1.7, True):  # not silently label 1
        with pytest.raises(ValueError, match=r"a label is an index \(int\) or a name \(str\)"):
            gi.label_summary(captured, not_a_label, stage)


@pytest.mark.parametrize("stage", [1, 4])
def test_patch_summary_matches_edges(captured, stage):
    data = captured.graph(stage)
    src = "pooled_patch" if stage == 1 else "patch"
    h, w = data["patch"].grid
    row, col = h - 1, w // 2
    s = gi.patch_summary(captured, stage, row, col)
    per_group = edges_into(data, src, "patch", row * w + col, captured.groups)
    sw = data[src].grid[1]
    assert s.source_type == src and s.source_grid == tuple(data[src].grid)
    assert s.neighbours == [[(i // sw, i % sw) for i in idx] for idx in per_group]
    assert s.distinct == len(set().union(*map(set, per_group)))
    stride = IMG_SIZE / data[src].grid[0]
    first = per_group[0][0]
    r, c = first // sw, first % sw
    assert s.boxes[0][0] == (c * stride, r * stride, (c + 1) * stride, (r + 1) * stride)
    with pytest.raises(ValueError, match="outside"):
        gi.patch_summary(captured, stage, h, 0)


def test_neighbour_count_distribution(model, captured):
    # float64: in float32 a batch of two may round differently from single images (BLAS blocking
    # depends on the row count), which can flip a near-tied neighbour and change a count by one.
    model = copy.deepcopy(model).double()
    captured = gi.capture_graphs(model, captured.tensor)
    flipped = captured.tensor.flip(-1)
    samples = [
        {"image": captured.tensor, "target": torch.tensor([1.0, 0, 0, 1])},
        None,
        {"image": flipped, "target": torch.tensor([0.0, 0, 1, 1])},
    ]
    counts = gi.neighbour_count_distribution(model, samples, batch_size=2, progress=False)
    other = gi.capture_graphs(model, flipped)
    for stage in range(1, 5):
        assert counts.counts[0, stage - 1].tolist() == [s.distinct for s in gi.summarize_labels(captured, [stage])]
        assert counts.counts[1, stage - 1].tolist() == [s.distinct for s in gi.summarize_labels(other, [stage])]
    hist = counts.histogram(2)
    assert hist.shape == (4, 10) and (hist.sum(1) == 2).all()
    for label in range(4):
        for n in range(2):
            assert hist[label, counts.counts[n, 1, label] - 9] >= 1
    assert counts.histogram(2, present_only=True).sum(1).tolist() == [1, 0, 1, 2]
    mean = counts.mean(2, present_only=True)
    assert np.isnan(mean[1]) and mean[3] == pytest.approx(counts.counts[:, 1, 3].float().mean().item())


def test_to_networkx(captured):
    k, g, num_labels = captured.k, captured.groups, len(NAMES)
    for stage in (1, 3):
        data = captured.graph(stage)
        graph = gi.to_networkx(captured, stage)
        n = data["patch"].num_nodes
        pooled = data["pooled_patch"].num_nodes if stage == 1 else 0
        assert graph.number_of_nodes() == n + pooled + num_labels
        assert graph.number_of_edges() == g * k * (n + num_labels)
        assert graph.nodes[("label", 2)]["name"] == "bird"
        h, w = data["patch"].grid
        assert graph.nodes[("patch", w + 2)]["pos"] == (1, 2)
        assert graph.nodes[("patch", w + 2)]["box"] == tuple(data["patch"].box[w + 2].tolist())
        into_label = [(u, d["group"]) for u, _, d in graph.in_edges(("label", 1), data=True)]
        s = gi.label_summary(captured, 1, stage)
        assert sorted(into_label) == sorted(
            (("patch", r * w + c), grp) for grp, cells in enumerate(s.neighbours) for r, c in cells
        )
        src = "pooled_patch" if stage == 1 else "patch"
        assert graph.in_degree(("patch", 0)) == g * k
        assert all(u[0] == src for u, _ in graph.in_edges(("patch", 0)))


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------
def assert_picture(path):
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100 and pixels.std() > 10


def test_label_and_patch_figures(captured, tmp_path):
    s = gi.label_summary(captured, "car", 2)
    fig = gi.plot_label(captured, "car", 2, tmp_path / "car.png")
    assert len(fig.highlighted) == s.distinct
    cells = {(r, c) for group in s.neighbours for r, c in group}
    assert {(r, c) for r, c, _ in fig.highlighted} == cells
    assert sum(len(groups) > 1 for *_, groups in fig.highlighted) == s.shared
    assert_picture(tmp_path / "car.png")
    # Two rectangles (fill and outline) per highlighted patch; the note is the suptitle.
    assert len(fig.figure.axes[0].patches) == 2 * s.distinct
    assert fig.figure._suptitle.get_text() == gi.RANDOM_WEIGHTS_NOTE

    p = gi.patch_summary(captured, 1, 5, 7)
    fig = gi.plot_patch(captured, 1, 5, 7, tmp_path / "patch.svg")
    assert len(fig.highlighted) == p.distinct
    assert {(r, c) for r, c, _ in fig.highlighted} == {rc for group in p.neighbours for rc in group}
    h, w = captured.graph(1)["patch"].grid
    assert len(fig.figure.axes[0].lines) == p.distinct + (h - 1) + (w - 1)  # one per neighbour + grid
    svg = (tmp_path / "patch.svg").read_text()
    assert svg.startswith("<?xml") and "<svg" in svg and "random weights" in svg
    assert fig._repr_png_().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match=r"\.png or \.svg"):
        fig.save(tmp_path / "patch.jpg")


def test_histogram_figure(model, captured, tmp_path):
    counts = gi.NeighbourCounts(
        counts=torch.tensor([[[9, 18, 12, 12]] * 4, [[10, 18, 12, 17]] * 4]), class_names=NAMES, k=9, groups=2
    )
    fig = gi.plot_neighbour_histogram(counts, 3, path=tmp_path / "hist.png")
    assert_picture(tmp_path / "hist.png")
    shown = np.asarray(fig.figure.axes[0].images[0].get_array())
    share = counts.histogram(3) / 2
    order = np.argsort(-counts.mean(3), kind="stable")  # highest mean on top
    np.testing.assert_allclose(shown, share[order])
    assert share[0, 0] == share[0, 1] == 0.5 and share[1, 9] == 1.0


# ---------------------------------------------------------------------------
# HTML viewer in headless Chromium
# ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def chromium():
    """The headless browser the viewer tests drive; no test installs it (``./setup.sh --test`` does)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium is not installed (/usr/bin/chromium missing; ./setup.sh --test installs it)")
    return path


# Appended to a copy of the page under test: reports what the browser shows of the state element.
VISIBILITY_PROBE = """<script>
(function () {
  const e = document.getElementById("state"), style = window.getComputedStyle(e);
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({display: style.display, boxes: e.getClientRects().length,
                                    height: e.offsetHeight, text: e.textContent.length,
                                    windowState: typeof window.viewerState});
  document.body.appendChild(out);
})();
</script>
"""


def dump_dom(chromium, page, query, tmp_path) -> str:
    """The DOM of ``page?query`` after its scripts ran, from headless Chromium."""
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--dump-dom",
        f"{page.as_uri()}?{query}",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert "<pre id=" in run.stdout, f"chromium printed no page: {run.stdout[:500]} {run.stderr[-1500:]}"
    return run.stdout


def page_state(chromium, page, query, tmp_path):
    """Load ``page?query`` in headless Chromium and return the JSON state the page wrote."""
    dom = dump_dom(chromium, page, query, tmp_path)
    match = re.search(r'<pre id="state"[^>]*>(.*?)</pre>', dom, re.S)
    assert match, f"no state in the page: {dom[:500]}"
    return json.loads(html.unescape(match.group(1)))


def test_viewer_state_element_is_hidden_markup(captured, tmp_path):
    """Without a browser: the state element carries ``hidden`` and no heading introduces it."""
    text = gi.write_html_viewer(captured, tmp_path / "viewer.html").read_text()
    assert re.search(r'<pre id="state" hidden></pre>', text) and "<h3>State</h3>" not in text


@pytest.mark.slow  # a browser
def test_viewer_hides_its_state_from_the_user(captured, chromium, tmp_path):
    """The JSON state stays in the page for scripts and tests, but the browser shows none of it."""
    page = gi.write_html_viewer(captured, tmp_path / "viewer.html")
    text = page.read_text()
    assert "<h3>State</h3>" not in text
    probed = tmp_path / "probed.html"
    probed.write_text(text.replace("</body>", VISIBILITY_PROBE + "</body>"))
    dom = dump_dom(chromium, probed, "stage=2", tmp_path)
    probe = json.loads(html.unescape(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1)))
    assert probe["text"] > 0 and probe["windowState"] == "object"  # the state is there ...
    assert probe["display"] == "none" and probe["boxes"] == 0 and probe["height"] == 0  # ... and not shown


@pytest.mark.slow  # a browser
def test_html_viewer_in_chromium(captured, chromium, tmp_path):
    page = gi.write_html_viewer(captured, tmp_path / "viewer.html")
    text = page.read_text()
    assert "<script src" not in text and "<link" not in text and "http://" not in text
    assert "data:image/png;base64," in text

    state = page_state(chromium, page, "stage=2&click=label-3", tmp_path)
    s = gi.label_summary(captured, 3, 2)
    assert (state["stage"], state["mode"], state["label"]) == (2, "label", 3)
    expect = sorted((r, c, g) for g, cells in enumerate(s.neighbours) for r, c in cells)
    assert sorted((h["row"], h["col"], h["group"]) for h in state["highlighted"]) == expect
    assert state["distinct"] == s.distinct

    # A click on a stage-1 patch (dispatched at its centre) shows its pooled sources.
    state = page_state(chromium, page, "stage=1&patch=6,9", tmp_path)
    p = gi.patch_summary(captured, 1, 6, 9)
    assert (state["mode"], state["patch"], state["sourceType"]) == ("patch", [6, 9], "pooled_patch")
    expect = sorted((r, c, g) for g, cells in enumerate(p.neighbours) for r, c in cells)
    assert sorted((h["row"], h["col"], h["group"]) for h in state["highlighted"]) == expect


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_coco(
        tmp_path_factory.mktemp("synthetic"), num_train=1, num_val=2, image_size=96, progress=False, workers=1
    )


@pytest.mark.slow  # the command line end to end
def test_cli_with_checkpoint_and_html(synthetic, tmp_path):
    cli = load_script("inspect_graphs")
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  name: gkgnet_ti\n  num_classes: 10\n  img_size: 96\n")
    torch.manual_seed(5)
    trained = gkg_pyg.create_model("gkgnet_ti", num_classes=10, img_size=96).eval()
    checkpoint = tmp_path / "model.pth"
    torch.save({"model": trained.state_dict(), "class_names": list(SYNTHETIC_CLASSES)}, checkpoint)
    images = sorted((synthetic / "val2014").glob("*.jpg"))
    out = tmp_path / "out"
    summary = cli.run(
        [
            "--config",
            str(config),
            "--checkpoint",
            str(checkpoint),
            "--image",
            str(images[0]),
            "--label",
            "circle",
            "star",
            "--stage",
            "2",
            "--patch",
            "3",
            "4",
            "--out",
            str(out),
            "--html",
            "--dataset",
            str(synthetic / "val2014"),
        ]
    )
    for name in ("label_circle_stage2.png", "label_star_stage2.png", "patch_stage2_r3_c4.png", "histogram_stage2.png"):
        assert_picture(out / name)
    assert (out / "viewer.html").stat().st_size > 1000
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    # The checkpoint's weights and class names were used.
    x = build_test_transform(96)(Image.open(images[0]).convert("RGB"))
    with torch.no_grad():
        scores = trained(x[None])[0].sigmoid()
    assert summary["note"] == ""
    assert list(summary["scores"]) == list(SYNTHETIC_CLASSES)
    np.testing.assert_allclose(list(summary["scores"].values()), scores.tolist(), rtol=1e-5, atol=1e-6)
    assert len(summary["labels"]) == 10 and all(9 <= s["distinct"] <= 18 for s in summary["labels"])
    assert summary["patch"]["source_type"] == "pooled_patch" and 9 <= summary["patch"]["distinct"] <= 18
    counts = json.loads((out / "neighbour_counts.json").read_text())
    assert len(counts["images"]) == 2 and sum(counts["stages"]["2"]["circle"]["histogram"]) == 2


def test_cli_random_weights(synthetic, tmp_path):
    cli = load_script("inspect_graphs")
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  name: gkgnet_ti\n  num_classes: 3\n  img_size: 96\n")
    image = sorted((synthetic / "val2014").glob("*.jpg"))[0]
    summary = cli.run(
        [
            "--config",
            str(config),
            "--image",
            str(image),
            "--label",
            "1",
            "--stage",
            "3",
            "--format",
            "svg",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert summary["note"] == gi.RANDOM_WEIGHTS_NOTE
    assert "random weights" in (tmp_path / "out" / "label_label_1_stage3.svg").read_text()
    assert [s["name"] for s in summary["labels"]] == ["label_0", "label_1", "label_2"]
    with pytest.raises(UsageError, match="--patch needs --stage"):  # one line from main, not argparse's usage
        cli.parse_args(["--config", "c", "--image", "i", "--out", "o", "--patch", "1", "2"])
    (tmp_path / "bad.yaml").write_text("model:\n  num_clases: 3\n")
    with pytest.raises(ValueError, match="num_classes"):  # unknown key, nearest valid one suggested
        cli.load_model(str(tmp_path / "bad.yaml"), None)


def test_cli_config_without_num_classes_or_checkpoint(synthetic, tmp_path):
    """The README's demo command without --checkpoint: the class names come from
    the config's data set (the synthetic one's fixed list, nothing generated)."""
    cli = load_script("inspect_graphs")
    image = sorted((synthetic / "val2014").glob("*.jpg"))[0]
    demo = ROOT / "experiments" / "configs" / "demo.yaml"
    summary = cli.run(["--config", str(demo), "--image", str(image), "--stage", "2", "--label", "circle",
                        "--out", str(tmp_path / "out")])  # fmt: skip
    assert summary["note"] == gi.RANDOM_WEIGHTS_NOTE and list(summary["scores"]) == list(SYNTHETIC_CLASSES)
    assert (tmp_path / "out" / "label_circle_stage2.png").is_file()
    # A data set that cannot be read: the error says what to pass instead.
    with pytest.raises(ValueError, match=r"num_classes is not set.*--set model.num_classes=N"):
        cli.load_model(str(demo), None, overrides=["data.name=coco", f"data.root={tmp_path / 'nothing'}"])
    model, names, _ = cli.load_model(str(demo), None, overrides=["data.name=coco", "model.num_classes=4"])
    assert names is None and model.num_classes == 4


# ---------------------------------------------------------------------------
# Notebook
# ---------------------------------------------------------------------------
# An end-to-end run of the notebook in a fresh kernel: the functions it calls are tested one by one
# above in the quick run.
@pytest.mark.slow
def test_notebook_runs_top_to_bottom():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    path = ROOT / "experiments" / "inspect_graphs.ipynb"
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()  # raises CellExecutionError on any failing cell
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 6  # image, 4 label views, patch view, histogram
    assert any("srcdoc" in o.get("data", {}).get("text/html", "") for o in outputs)
