"""Look inside the graphs GKGNet builds: capture, summaries, figures, export.

:func:`capture_graphs` runs one forward pass on one image and keeps the four
per-stage :class:`~torch_geometric.data.HeteroData` graphs the model built
(layout in :mod:`gkg_pyg.graph`), the input image and the scores.  On top of
that:

* summaries: which patches a label node connects to in every group, how many
  distinct patches that is (between ``K`` and ``K*G``) and how the groups
  overlap (:func:`label_summary`); what one patch links to
  (:func:`patch_summary`); the distribution of the distinct-neighbour counts
  over a data set (:func:`neighbour_count_distribution`);
* figures (matplotlib, Agg canvas, PNG or SVG by the file extension): the
  label view of the paper's Fig. 5 / A1-A4 (:func:`plot_label`), the patch
  view of Fig. 6 (:func:`plot_patch`) and a histogram of the counts
  (:func:`plot_neighbour_histogram`);
* :func:`to_networkx` and a self-contained HTML viewer
  (:func:`write_html_viewer`).

Stages are numbered 1..4 as in the paper.  Grid coordinates are ``(row,
col)`` in the stage's patch grid, or in its pooled source grid for the
patch-level sources of stages 1 and 2 (4x4 and 2x2 averaged cells).
"""

from __future__ import annotations

import base64
import colorsys
import io
import json
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from PIL import Image
from torch import Tensor, nn
from torch_geometric.data import HeteroData
from tqdm import tqdm

from .data.images import load_rgb
from .errors import InputSizeError, UsageError
from .data.transforms import MEAN, STD, build_test_transform
from .graph import neighbour_table, stack_group_edges

__all__ = [
    "RANDOM_WEIGHTS_NOTE",
    "CapturedGraphs",
    "InspectFigure",
    "LabelSummary",
    "NeighbourCounts",
    "PatchSummary",
    "capture_graphs",
    "distinct_counts",
    "label_neighbours",
    "label_summary",
    "neighbour_count_distribution",
    "patch_neighbours",
    "patch_summary",
    "plot_label",
    "plot_neighbour_histogram",
    "plot_patch",
    "prepare_image",
    "source_type",
    "summarize_labels",
    "to_networkx",
    "viewer_data",
    "write_html_viewer",
]

ImageLike = Union[Image.Image, str, os.PathLike, Tensor]
Cell = Tuple[int, int, Tuple[int, ...]]  # (row, col, groups that chose the cell)

# Group colours (matplotlib's tab10 without red); red marks cells chosen by several groups.
GROUP_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#17becf", "#bcbd22", "#e377c2")
SEVERAL_COLOUR = "#d62728"
TARGET_COLOUR = "#ffd700"
RANDOM_WEIGHTS_NOTE = "random weights (no checkpoint)"


def group_colours(groups: int) -> List[str]:
    """One colour per group: the fixed palette, or evenly spaced hues (red left out) beyond it."""
    if groups <= len(GROUP_COLOURS):
        return list(GROUP_COLOURS[:groups])
    hues = np.linspace(0.08, 0.92, groups)
    return ["#%02x%02x%02x" % tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h, 0.8, 0.9)) for h in hues]


# ---------------------------------------------------------------------------
# Capture
# ---------------------------------------------------------------------------
@dataclass
class CapturedGraphs:
    """The graphs of one forward pass on one image.

    Attributes:
        graphs: one :class:`HeteroData` per stage (``graphs[s - 1]`` is stage ``s``).
        image: ``(H, W, 3)`` uint8, the model input de-normalised (for drawing).
        tensor: ``(3, H, W)`` the normalised model input.
        logits: ``(L,)``; scores: ``(L,)`` their sigmoid.
        class_names: the ``L`` label names.
        k, groups: the model's ``K`` and ``G``.
        note: a remark every figure and the viewer show (e.g. "random weights").
    """

    graphs: List[HeteroData]
    image: np.ndarray
    tensor: Tensor
    logits: Tensor
    scores: Tensor
    class_names: List[str]
    k: int
    groups: int
    note: str = ""

    @property
    def num_stages(self) -> int:
        return len(self.graphs)

    def graph(self, stage: int) -> HeteroData:
        """The :class:`HeteroData` of ``stage`` (1-based)."""
        if not 1 <= stage <= len(self.graphs):
            raise UsageError(f"stage must be in 1..{len(self.graphs)}, got {stage}")
        return self.graphs[stage - 1]

    def label_index(self, label: Union[int, str]) -> int:
        """A label given by index or name -> its index."""
        if isinstance(label, str):
            if label not in self.class_names:
                raise UsageError(f"unknown label {label!r}; the labels are {self.class_names}")
            return self.class_names.index(label)
        try:
            index = operator.index(label) if not isinstance(label, bool) else None
        except TypeError:
            index = None
        if index is None:
            raise UsageError(f"a label is an index (int) or a name (str), got {label!r}")
        if not 0 <= index < len(self.class_names):
            raise UsageError(f"label index {label} out of range 0..{len(self.class_names) - 1}")
        return index


def _check_image_tensor(x: Tensor) -> Tensor:
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a normalised (3, H, W) image tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():  # raw pixels: casting them would pass 0..255 off as normalised values
        raise InputSizeError(
            f"expected a floating-point image, normalised per channel with the model's mean and std, got {x.dtype}; "
            "pass an image file or PIL image (normalised here), or use gkg_pyg.data.build_test_transform(img_size)"
        )
    return x.float()


def default_transform(model: nn.Module) -> Callable:
    """The test transform at the model's construction size (square sizes only)."""
    h, w = model.img_size
    if h != w:
        raise ValueError(f"the test transform is square but the model was built at {h}x{w}; pass transform=")
    return build_test_transform(h)


def prepare_image(image: ImageLike, transform: Optional[Callable] = None, model: Optional[nn.Module] = None) -> Tensor:
    """A PIL image, an image path or a normalised tensor -> ``(3, H, W)`` float tensor.

    PIL images and paths go through ``transform`` (default: the test
    transform at ``model``'s construction size); tensors are used as they are.
    """
    if isinstance(image, Tensor):
        return _check_image_tensor(image)
    if isinstance(image, (str, os.PathLike)):
        image = load_rgb(os.fspath(image))
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image, a path or a (3, H, W) tensor, got {type(image).__name__}")
    if transform is None:
        if model is None:
            raise ValueError("pass a transform or a model to turn a PIL image into a tensor")
        transform = default_transform(model)
    return _check_image_tensor(transform(image.convert("RGB")))


def denormalise(x: Tensor) -> np.ndarray:
    """``(3, H, W)`` normalised tensor -> ``(H, W, 3)`` uint8 image."""
    mean = torch.tensor(MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    pixels = ((x * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(1, 2, 0).cpu().numpy()


def _resolve_names(model: nn.Module, class_names: Optional[Sequence[str]]) -> List[str]:
    num = model.num_classes
    names = class_names if class_names is not None else getattr(model, "class_names", None)
    if names is None:
        return [f"label_{i}" for i in range(num)]
    if len(names) != num:
        raise ValueError(f"{len(names)} class names for a model with {num} classes")
    return [str(n) for n in names]


def capture_graphs(
    model: nn.Module,
    image: ImageLike,
    class_names: Optional[Sequence[str]] = None,
    transform: Optional[Callable] = None,
    note: str = "",
) -> CapturedGraphs:
    """Run ONE forward pass of ``model`` (eval mode, no gradient; the training
    flag is restored afterwards) on one image and keep the graphs it built.

    Args:
        model: a :class:`gkg_pyg.GKGNet`.
        image: a PIL image, an image path or a normalised ``(3, H, W)`` tensor.
        class_names: label names (default: the model's, else ``label_i``).
        transform: PIL image -> tensor (default: the test transform at the
            model's construction size).
        note: a remark for the figures, e.g. ``RANDOM_WEIGHTS_NOTE``.
    """
    x = prepare_image(image, transform, model)
    names = _resolve_names(model, class_names)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype  # images follow the model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits, graphs = model(x[None].to(device, dtype), return_graphs=True)
    finally:
        model.train(was_training)
    graphs = [g.to("cpu") for g in graphs]
    for g in graphs:
        for store in g.node_stores:
            if "grid" in store:  # .to() turns tuples into lists; keep the model's (h, w) tuples
                store.grid = tuple(store.grid)
        if "label" in g.node_types:
            g["label"].name = list(names)
    logits = logits[0].cpu()
    return CapturedGraphs(
        graphs=graphs,
        image=denormalise(x.cpu()),
        tensor=x.cpu(),
        logits=logits,
        scores=logits.sigmoid(),
        class_names=names,
        k=int(model.k),
        groups=int(model.groups),
        note=note,
    )


# ---------------------------------------------------------------------------
# Neighbour tables and summaries
# ---------------------------------------------------------------------------
def source_type(data: HeteroData) -> str:
    """Node type of the patch-level sources: ``pooled_patch`` (stages 1, 2) or ``patch``."""
    return "pooled_patch" if "pooled_patch" in data.node_types else "patch"


def _require_labels(data: HeteroData) -> None:
    if "label" not in data.node_types:
        raise UsageError("these graphs have no label nodes (a model built with cross_level=False)")


def label_neighbours(captured: CapturedGraphs, stage: int) -> Tensor:
    """``(G, L, K)``: the patch indices (row-major in the stage grid) each label chose per group."""
    data = captured.graph(stage)
    _require_labels(data)
    return neighbour_table(stack_group_edges(data, "patch", "label"), data["label"].x.shape[0])


def patch_neighbours(captured: CapturedGraphs, stage: int) -> Tensor:
    """``(G, N, K)``: the source indices (row-major in the source grid) each patch chose per group."""
    data = captured.graph(stage)
    return neighbour_table(stack_group_edges(data, source_type(data), "patch"), data["patch"].num_nodes)


def distinct_counts(table: Tensor) -> Tensor:
    """``(G, N, K)`` neighbour tables -> ``(N,)`` distinct sources over all groups."""
    g, n, k = table.shape
    flat = table.permute(1, 0, 2).reshape(n, g * k).sort(dim=1).values
    return 1 + (flat[:, 1:] != flat[:, :-1]).sum(dim=1)


def _cells(rows: Tensor, pos: Tensor) -> List[Cell]:
    """``(G, K)`` neighbour indices -> one ``(row, col, groups)`` per distinct source, in index order."""
    chosen: Dict[int, List[int]] = {}
    for g, idx in enumerate(rows.tolist()):
        for i in idx:
            chosen.setdefault(i, [])
            if g not in chosen[i]:
                chosen[i].append(g)
    return [(int(pos[i, 0]), int(pos[i, 1]), tuple(gs)) for i, gs in sorted(chosen.items())]


def _overlap(rows: Tensor) -> List[List[int]]:
    """``(G, K)`` -> ``G x G`` sizes of the intersections of the groups' neighbour sets."""
    sets = [set(r) for r in rows.tolist()]
    return [[len(a & b) for b in sets] for a in sets]


@dataclass
class LabelSummary:
    """Where one label node looks at one stage.

    ``neighbours[g]`` lists the ``(row, col)`` patches of group ``g`` (nearest
    first); ``distinct`` counts the patches over all groups (``K .. K*G``);
    ``shared`` those chosen by several groups; ``overlap[a][b]`` the patches
    groups ``a`` and ``b`` have in common.
    """

    stage: int
    label: int
    name: str
    score: float
    neighbours: List[List[Tuple[int, int]]]
    distinct: int
    shared: int
    overlap: List[List[int]]


def label_summary(captured: CapturedGraphs, label: Union[int, str], stage: int) -> LabelSummary:
    """The neighbours, distinct count and group overlap of one label at one stage."""
    index = captured.label_index(label)
    rows = label_neighbours(captured, stage)[:, index]
    pos = captured.graph(stage)["patch"].pos
    cells = _cells(rows, pos)
    return LabelSummary(
        stage=stage,
        label=index,
        name=captured.class_names[index],
        score=float(captured.scores[index]),
        neighbours=[[(int(pos[i, 0]), int(pos[i, 1])) for i in r] for r in rows.tolist()],
        distinct=len(cells),
        shared=sum(len(gs) > 1 for *_, gs in cells),
        overlap=_overlap(rows),
    )


def summarize_labels(captured: CapturedGraphs, stages: Optional[Sequence[int]] = None) -> List[LabelSummary]:
    """:func:`label_summary` of every label at every stage (default all)."""
    stages = range(1, captured.num_stages + 1) if stages is None else stages
    return [label_summary(captured, i, s) for s in stages for i in range(len(captured.class_names))]


@dataclass
class PatchSummary:
    """What one patch links to at one stage (its patch-level neighbours).

    ``neighbours[g]`` lists the ``(row, col)`` sources of group ``g`` in the
    ``source_type`` grid of size ``source_grid``; ``boxes[g]`` their pixel
    boxes ``(x0, y0, x1, y1)``; ``box`` is the patch's own box.
    """

    stage: int
    row: int
    col: int
    box: Tuple[float, float, float, float]
    source_type: str
    source_grid: Tuple[int, int]
    neighbours: List[List[Tuple[int, int]]]
    boxes: List[List[Tuple[float, float, float, float]]]
    distinct: int
    shared: int
    overlap: List[List[int]]


def _patch_index(data: HeteroData, stage: int, row: int, col: int) -> int:
    h, w = data["patch"].grid
    if not (0 <= row < h and 0 <= col < w):
        raise UsageError(f"patch ({row}, {col}) is outside the {h}x{w} grid of stage {stage}")
    return row * w + col


def patch_summary(captured: CapturedGraphs, stage: int, row: int, col: int) -> PatchSummary:
    """The patch-level neighbours of patch ``(row, col)`` of ``stage``."""
    data = captured.graph(stage)
    index = _patch_index(data, stage, row, col)
    rows = patch_neighbours(captured, stage)[:, index]
    src = source_type(data)
    pos, box = data[src].pos, data[src].box
    cells = _cells(rows, pos)
    return PatchSummary(
        stage=stage,
        row=row,
        col=col,
        box=tuple(data["patch"].box[index].tolist()),
        source_type=src,
        source_grid=tuple(data[src].grid),
        neighbours=[[(int(pos[i, 0]), int(pos[i, 1])) for i in r] for r in rows.tolist()],
        boxes=[[tuple(box[i].tolist()) for i in r] for r in rows.tolist()],
        distinct=len(cells),
        shared=sum(len(gs) > 1 for *_, gs in cells),
        overlap=_overlap(rows),
    )


# ---------------------------------------------------------------------------
# Over a data set
# ---------------------------------------------------------------------------
@dataclass
class NeighbourCounts:
    """Distinct-neighbour counts of the label nodes over a data set.

    ``counts``: ``(num_images, num_stages, L)``; ``targets``: ``(num_images, L)``
    when the data set gave them (samples as dicts with a ``"target"``), else None.
    """

    counts: Tensor
    class_names: List[str]
    k: int
    groups: int
    targets: Optional[Tensor] = None
    note: str = ""

    def _select(self, stage: int, present_only: bool) -> List[Tensor]:
        if not 1 <= stage <= self.counts.shape[1]:
            raise UsageError(f"stage must be in 1..{self.counts.shape[1]}, got {stage}")
        counts = self.counts[:, stage - 1]
        if not present_only:
            return list(counts.t())
        if self.targets is None:
            raise ValueError("present_only needs targets: iterate over samples with a 'target'")
        return [counts[self.targets[:, j] > 0, j] for j in range(counts.shape[1])]

    def histogram(self, stage: int, present_only: bool = False) -> np.ndarray:
        """``(L, K*G - K + 1)``: column ``j`` counts the images where the label
        touched ``K + j`` distinct patches (only images showing the label if ``present_only``)."""
        return np.stack(
            [
                np.bincount((c - self.k).numpy(), minlength=self.k * (self.groups - 1) + 1)
                for c in self._select(stage, present_only)
            ]
        )

    def mean(self, stage: int, present_only: bool = False) -> np.ndarray:
        """``(L,)`` the mean distinct count per label (NaN where no image counts)."""
        return np.array([c.float().mean().item() if len(c) else np.nan for c in self._select(stage, present_only)])


def _as_sample(item) -> Tuple[ImageLike, Optional[Tensor]]:
    if isinstance(item, dict):
        return item["image"], item.get("target")
    return item, None


def neighbour_count_distribution(
    model: nn.Module,
    images: Iterable,
    class_names: Optional[Sequence[str]] = None,
    transform: Optional[Callable] = None,
    batch_size: int = 8,
    progress: bool = True,
    note: str = "",
) -> NeighbourCounts:
    """Distinct-neighbour counts of every label node at every stage over ``images``.

    ``images`` yields PIL images, paths, ``(3, H, W)`` tensors or data-set
    samples (dicts with ``"image"`` and optionally ``"target"``; None, a
    skipped unreadable image, is passed over).  Images are
    run ``batch_size`` at a time (eval mode, no gradient; in eval mode the
    batch does not change any image's graphs); a tqdm bar shows progress.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    names = _resolve_names(model, class_names)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype  # images follow the model
    counts, targets, batch = [], [], []

    def flush():
        with torch.no_grad():
            _, graphs = model(torch.stack(batch).to(device, dtype), return_graphs=True)
        per_stage = []
        for data in graphs:
            _require_labels(data)
            table = neighbour_table(stack_group_edges(data, "patch", "label"), data["label"].x.shape[0])
            per_stage.append(distinct_counts(table).view(len(batch), -1).cpu())
        counts.append(torch.stack(per_stage, dim=1))
        bar.update(len(batch))
        batch.clear()

    bar = tqdm(
        total=len(images) if hasattr(images, "__len__") else None, desc="graphs", unit="image", disable=not progress
    )
    was_training = model.training
    model.eval()
    try:
        for item in images:
            if item is None:  # a data set's unreadable image (skip_bad_images=True)
                bar.update(1)
                continue
            image, target = _as_sample(item)
            x = prepare_image(image, transform, model)
            if batch and x.shape != batch[0].shape:
                flush()  # sizes differ: a batch holds one size
            batch.append(x)
            targets.append(target)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    finally:
        model.train(was_training)
        bar.close()
    if not counts:
        raise UsageError("no images to count over")
    stacked_targets = None
    if all(t is not None for t in targets):
        stacked_targets = torch.stack([torch.as_tensor(t) for t in targets]).cpu()
    return NeighbourCounts(
        counts=torch.cat(counts),
        class_names=names,
        k=int(model.k),
        groups=int(model.groups),
        targets=stacked_targets,
        note=note,
    )


# ---------------------------------------------------------------------------
# networkx
# ---------------------------------------------------------------------------
def to_networkx(captured: CapturedGraphs, stage: int):
    """The graph of ``stage`` as a :class:`networkx.MultiDiGraph`.

    Nodes are ``(type, index)`` with attributes ``type``, ``index``, ``pos``
    (row, col) and ``box`` (x0, y0, x1, y1) for patch and pooled-patch nodes,
    ``name`` and ``score`` for label nodes; edges point from source to
    destination with the attribute ``group`` (a multigraph, since several
    groups may choose the same source).
    """
    try:
        import networkx as nx
    except ImportError as err:  # networkx is only a test/extra dependency
        raise ImportError("to_networkx needs networkx (pip install networkx)") from err
    data = captured.graph(stage)
    graph = nx.MultiDiGraph(stage=stage, k=captured.k, groups=captured.groups)
    for ntype in data.node_types:
        if ntype == "label":
            for i, name in enumerate(captured.class_names):
                graph.add_node(("label", i), type="label", index=i, name=name, score=float(captured.scores[i]))
            continue
        pos, box = data[ntype].pos.tolist(), data[ntype].box.tolist()
        for i in range(len(pos)):
            graph.add_node((ntype, i), type=ntype, index=i, pos=tuple(pos[i]), box=tuple(box[i]))
    for src, rel, dst in data.edge_types:
        group = int(rel.split("_")[1])
        s, d = data[src, rel, dst].edge_index.tolist()
        graph.add_edges_from(((src, a), (dst, b), {"group": group}) for a, b in zip(s, d))
    return graph


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------
@dataclass
class InspectFigure:
    """A figure and what it highlights: ``(row, col, groups)`` per drawn cell."""

    figure: Figure
    highlighted: List[Cell] = field(default_factory=list)

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write the figure as PNG or SVG (by the extension of ``path``)."""
        path = Path(path)
        fmt = path.suffix.lower().lstrip(".")
        if fmt not in ("png", "svg"):
            raise ValueError(f"figures are written as .png or .svg, not {path.name!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        # SVG text stays text (searchable, editable), not glyph outlines.
        with matplotlib.rc_context({"svg.fonttype": "none"}):
            self.figure.savefig(path, format=fmt, dpi=150, bbox_inches="tight")
        return path

    def _repr_png_(self) -> bytes:  # shown inline by Jupyter
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        return buffer.getvalue()


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)  # Agg regardless of pyplot's backend
    return figure


def _image_axes(captured: CapturedGraphs, grid: Optional[Tuple[int, int]] = None):
    h, w = captured.image.shape[:2]
    figure = _new_figure(5.5, 5.5 * h / w + 0.9)
    ax = figure.add_subplot()
    ax.imshow(captured.image, extent=(0, w, h, 0), interpolation="nearest")
    if grid is not None:  # the stage's patch grid, faint
        gh, gw = grid
        for r in range(1, gh):
            ax.axhline(r * h / gh, color="white", lw=0.3, alpha=0.35)
        for c in range(1, gw):
            ax.axvline(c * w / gw, color="white", lw=0.3, alpha=0.35)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    if captured.note:
        figure.suptitle(captured.note, color="#b00000", fontsize=10)
    return figure, ax


def _cell_colour(groups: Tuple[int, ...], colours: List[str]) -> str:
    return colours[groups[0]] if len(groups) == 1 else SEVERAL_COLOUR


def _draw_cells(ax, cells: List[Cell], boxes: List[Sequence[float]], colours: List[str]) -> None:
    for (_, _, groups), (x0, y0, x1, y1) in zip(cells, boxes):
        colour = _cell_colour(groups, colours)
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, facecolor=colour, alpha=0.45, edgecolor="none"))
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, facecolor="none", edgecolor=colour, lw=1.2))


def _legend(ax, groups: int, colours: List[str], extra: Sequence[Patch] = ()) -> None:
    handles = [Patch(color=colours[g], alpha=0.7, label=f"group {g}") for g in range(groups)]
    several = "both groups" if groups == 2 else "several groups"
    handles.append(Patch(color=SEVERAL_COLOUR, alpha=0.7, label=several))
    ax.legend(
        handles=list(extra) + handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.01),
        ncol=min(len(handles) + len(extra), 4),
        fontsize=8,
        frameon=False,
    )


def _cell_boxes(data: HeteroData, node_type: str, cells: List[Cell]) -> List[List[float]]:
    w = data[node_type].grid[1]
    return [data[node_type].box[r * w + c].tolist() for r, c, _ in cells]


def plot_label(
    captured: CapturedGraphs, label: Union[int, str], stage: int, path: Optional[Union[str, os.PathLike]] = None
) -> InspectFigure:
    """The image with the patches ``label`` connects to at ``stage``: one colour
    per group, red for patches chosen by several groups (paper Fig. 5, A1-A4).

    Returns the figure and its highlighted ``(row, col, groups)`` patches
    (as many as the label's distinct neighbours); written to ``path`` if given.
    """
    index = captured.label_index(label)
    data = captured.graph(stage)
    rows = label_neighbours(captured, stage)[:, index]
    cells = _cells(rows, data["patch"].pos)
    colours = group_colours(captured.groups)
    figure, ax = _image_axes(captured, data["patch"].grid)
    _draw_cells(ax, cells, _cell_boxes(data, "patch", cells), colours)
    _legend(ax, captured.groups, colours)
    k, g = captured.k, captured.groups
    ax.set_title(
        f"{captured.class_names[index]}: score {float(captured.scores[index]):.3f}\n"
        f"stage {stage}: {len(cells)} distinct patches (K={k} .. K*G={k * g})",
        fontsize=10,
    )
    result = InspectFigure(figure, cells)
    if path is not None:
        result.save(path)
    return result


def plot_patch(
    captured: CapturedGraphs, stage: int, row: int, col: int, path: Optional[Union[str, os.PathLike]] = None
) -> InspectFigure:
    """Patch ``(row, col)`` of ``stage`` (gold outline), its patch-level
    neighbours per group (pooled source cells drawn as their pixel boxes) and
    lines to them (paper Fig. 6).

    Returns the figure and the highlighted source cells ``(row, col, groups)``
    in the source grid; written to ``path`` if given.
    """
    data = captured.graph(stage)
    index = _patch_index(data, stage, row, col)
    rows = patch_neighbours(captured, stage)[:, index]
    src = source_type(data)
    cells = _cells(rows, data[src].pos)
    boxes = _cell_boxes(data, src, cells)
    colours = group_colours(captured.groups)
    figure, ax = _image_axes(captured, data["patch"].grid)
    _draw_cells(ax, cells, boxes, colours)
    x0, y0, x1, y1 = data["patch"].box[index].tolist()
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    for (_, _, groups), (a0, b0, a1, b1) in zip(cells, boxes):
        ax.plot([cx, (a0 + a1) / 2], [cy, (b0 + b1) / 2], color=_cell_colour(groups, colours), lw=1.2)
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, facecolor="none", edgecolor=TARGET_COLOUR, lw=2.5))
    _legend(ax, captured.groups, colours, [Patch(facecolor="none", edgecolor=TARGET_COLOUR, lw=2, label="patch")])
    what = "patches" if src == "patch" else f"{data[src].grid[0]}x{data[src].grid[1]} pooled cells"
    k, g = captured.k, captured.groups
    ax.set_title(
        f"stage {stage}, patch ({row}, {col}) of {data['patch'].grid[0]}x{data['patch'].grid[1]}\n"
        f"{len(cells)} distinct neighbours among {what} (K={k} .. K*G={k * g})",
        fontsize=10,
    )
    result = InspectFigure(figure, cells)
    if path is not None:
        result.save(path)
    return result


def plot_neighbour_histogram(
    counts: NeighbourCounts, stage: int, present_only: bool = False, path: Optional[Union[str, os.PathLike]] = None
) -> InspectFigure:
    """Per label, the distribution of its distinct-neighbour counts at ``stage``
    over the data set: a heat map (labels x counts ``K .. K*G``, colour = share
    of the images) with the mean count marked; labels sorted by mean."""
    hist = counts.histogram(stage, present_only)
    mean = counts.mean(stage, present_only)
    totals = hist.sum(axis=1, keepdims=True)
    share = np.divide(hist, totals, out=np.zeros(hist.shape), where=totals > 0)
    order = np.argsort(-np.nan_to_num(mean, nan=-1.0), kind="stable")  # highest mean on top
    k, g = counts.k, counts.groups
    num_labels = len(order)
    figure = _new_figure(6.5, 1.6 + 0.22 * num_labels)
    ax = figure.add_subplot()
    image = ax.imshow(
        share[order],
        aspect="auto",
        cmap="viridis",
        vmin=0,
        vmax=1,
        extent=(k - 0.5, k * g + 0.5, num_labels - 0.5, -0.5),
        interpolation="nearest",
    )
    ax.scatter(mean[order], np.arange(num_labels), color="white", edgecolor="black", s=18, zorder=3, label="mean")
    ax.set_yticks(np.arange(num_labels))
    ax.set_yticklabels([counts.class_names[i] for i in order], fontsize=7 if num_labels > 30 else 9)
    ax.set_xticks(np.arange(k, k * g + 1))
    ax.set_xlabel(f"distinct patches a label touches (K={k} .. K*G={k * g})")
    figure.colorbar(image, ax=ax, label="share of images")
    which = "images showing the label" if present_only else "images"
    ax.set_title(f"stage {stage}: {counts.counts.shape[0]} {which} (dots: mean)", fontsize=10)
    if counts.note:
        figure.suptitle(counts.note, color="#b00000", fontsize=10)
    result = InspectFigure(figure)
    if path is not None:
        result.save(path)
    return result


# ---------------------------------------------------------------------------
# HTML viewer
# ---------------------------------------------------------------------------
VIEWER_TEMPLATE = Path(__file__).with_name("inspect_assets") / "viewer.html"
DATA_PLACEHOLDER = "__GKG_GRAPH_DATA__"


def _png_data_url(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def viewer_data(captured: CapturedGraphs) -> dict:
    """The JSON the HTML viewer embeds: image, labels and, per stage, the grids
    and the neighbour tables ``labelNeighbours[l][g]`` (patch indices) and
    ``patchNeighbours[n][g]`` (source indices), row-major indices."""
    h, w = captured.image.shape[:2]
    stages = []
    for s in range(1, captured.num_stages + 1):
        data = captured.graph(s)
        src = source_type(data)
        grid, sgrid = tuple(data["patch"].grid), tuple(data[src].grid)
        stride = (h / grid[0], w / grid[1])
        pool = grid[0] // sgrid[0]
        stages.append(
            dict(
                stage=s,
                grid=list(grid),
                cell=list(stride),
                sourceType=src,
                sourceGrid=list(sgrid),
                sourceCell=[stride[0] * pool, stride[1] * pool],
                labelNeighbours=label_neighbours(captured, s).permute(1, 0, 2).tolist(),
                patchNeighbours=patch_neighbours(captured, s).permute(1, 0, 2).tolist(),
            )
        )
    return dict(
        image=_png_data_url(captured.image),
        width=w,
        height=h,
        k=captured.k,
        groups=captured.groups,
        note=captured.note,
        colours=group_colours(captured.groups),
        severalColour=SEVERAL_COLOUR,
        targetColour=TARGET_COLOUR,
        labels=[dict(name=n, score=float(sc)) for n, sc in zip(captured.class_names, captured.scores)],
        stages=stages,
    )


def write_html_viewer(captured: CapturedGraphs, path: Union[str, os.PathLike]) -> Path:
    """Write a self-contained HTML viewer (inline JS/CSS, image and graphs
    embedded; works offline from the file alone).

    Pick a stage and a label (or click a patch) and the chosen neighbours light
    up per group.  The page state is ``window.viewerState = {stage, mode,
    label, patch, sourceType, highlighted: [{row, col, group}, ...]}`` (one
    entry per cell and group) and is mirrored as JSON in ``<pre id="state">``.
    URL parameters ``stage=N``, ``label=I``, ``patch=ROW,COL`` and
    ``click=ELEMENT_ID`` replay clicks on load through the same handlers.
    """
    payload = json.dumps(viewer_data(captured), separators=(",", ":")).replace("</", "<\\/")
    template = VIEWER_TEMPLATE.read_text(encoding="utf-8")
    if DATA_PLACEHOLDER not in template:
        raise ValueError(f"{VIEWER_TEMPLATE} lacks the data placeholder {DATA_PLACEHOLDER}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(template.replace(DATA_PLACEHOLDER, payload), encoding="utf-8")
    return path
