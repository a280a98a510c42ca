"""Independent dense plain-PyTorch reference of GKGNet, used by tests only.

Written from /work/shared/GKGNET_SPEC.md and checked against the authors'
implementation (github jin-s13/GKGNet: mmcls/models/backbones/gkgnet.py,
mmcls/models/backbones/vig_model/*.py, mmcls/models/heads/label_query_head.py).
Everything is dense and loop-friendly on purpose: it must be easy to read and
obviously right, not fast.  It imports nothing from ``gkg_pyg`` or
``torch_geometric`` so that it can prove the main implementation exact.

Module names reproduce the authors' mmcls checkpoint layout, so
``ReferenceGKGNet("s").load_state_dict(ckpt["state_dict"])`` works:

* ``backbone.stem.convs.{0,1,3,4,6,7}``   conv/BN of the stem (2 and 5: GELU)
* ``backbone.pos_embed``                   (1, C0, S/4, S/4)
* ``backbone.backbone.{j}``                flat list [block, block, down, ...]
  - block ``.0`` = Grapher: ``fc1.{0,1}``, ``graph_conv.gconv.nn.{0,1}``,
    ``fc2.{0,1}``, ``relative_pos``; block ``.1`` = FFN: ``fc1.{0,1}``, ``fc2.{0,1}``
  - downsample: ``conv.{0,1}``
* ``backbone.label_lt.weight``             (L, C0)
* ``backbone.gcn_label.{s}.{r}``           cross-level module r of stage s
* ``backbone.ffn_label.{s}.0``             Linear(C_s -> C_{s+1}), s = 0..2
* ``head.fc1``, ``head.fc2``               Linear(C3 -> L)
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

# name -> (channels per stage, patch blocks per stage)
VARIANTS = {
    "ti": ((48, 96, 240, 384), (2, 2, 6, 2)),
    "s": ((80, 160, 400, 640), (2, 2, 6, 2)),
    "m": ((96, 192, 384, 768), (2, 2, 16, 2)),
    "b": ((128, 256, 512, 1024), (2, 2, 18, 2)),
}
REDUCE_RATIOS = (4, 2, 1, 1)  # source pooling of the patch graph, per stage


# ----------------------------------------------------------------------------
# Relative position table
# ----------------------------------------------------------------------------
def relative_position_table(channels, n, r, rows_per_chunk=256):
    """The stored (negated) relative-position term of a patch Grapher.

    ``n`` is the construction node count of the stage (a g x g grid, nodes
    row-major), ``r`` its source pooling.  T = 2 P P^T / D with P the
    MAE-style 2-D sine-cosine embedding of dimension D = 4 * (C // 4); in
    closed form T_ij = (2 / D) * sum_k [cos(w_k dx_ij) + cos(w_k dy_ij)],
    w_k = 1 / 10000^(k / (C // 4)), k = 0 .. C//4 - 1.  It is computed in
    float64, cast to float32 (as the authors store it), resampled bicubically
    (align_corners=False) to (n, n // r^2), and negated so that
    ``dist + table`` = dist - T.

    The row axis keeps its size, so bicubic weights along it are exactly
    (0, 1, 0, 0) and every output row depends on its own input row only: the
    table is built in blocks of whole grid rows (about ``rows_per_chunk``
    nodes) to bound memory; the result does not depend on the block size.

    Returns a float32 tensor (1, n, n // r^2).
    """
    grid = math.isqrt(n)
    if grid * grid != n:
        raise ValueError(f"stage node count {n} is not a square grid")
    quarter = channels // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid, dtype=torch.float64)
    # axis[a, b] = sum_k cos(w_k (a - b)): the term of one axis, (g, g)
    axis = torch.cos((pos[:, None, None] - pos[None, :, None]) * omega).sum(-1)
    out = torch.empty(n, n // (r * r))
    grid_rows = max(1, rows_per_chunk // grid)
    for first in range(0, grid, grid_rows):
        last = min(grid, first + grid_rows)
        # (row_i, col_i, row_j, col_j) -> dy term + dx term
        table = axis[first:last, None, :, None] + axis[None, :, None, :]
        table = (2.0 / (4 * quarter) * table).reshape((last - first) * grid, n).float()
        out[first * grid : last * grid] = F.interpolate(
            table[None, None], size=(table.shape[0], out.shape[1]), mode="bicubic", align_corners=False
        )[0, 0]
    return -out[None]


def resize_relative_position(table, num_dst, num_src):
    """Bicubic (align_corners=False) resampling of a (1, n, m) table to
    (1, num_dst, num_src); the identity when the size already matches."""
    if table.shape[-2:] == (num_dst, num_src):
        return table
    return F.interpolate(table[None], size=(num_dst, num_src), mode="bicubic", align_corners=False)[0]


# ----------------------------------------------------------------------------
# Group kNN and group max-relative aggregation
# ----------------------------------------------------------------------------
def _unit(x):
    """L2-normalise along dim 2 (the sub-vector channels), as F.normalize(eps=1e-12)."""
    return x / x.norm(dim=2, keepdim=True).clamp_min(1e-12)


def group_knn(dst, src, k, groups, dilation=1, position=None):
    """Dilated group kNN of every destination among the sources of its image.

    Args:
        dst: (B, C, N) destination features.
        src: (B, C, M) source features.
        k: neighbours kept per destination and group.
        groups: G; channels are split into G contiguous chunks of C/G.
        dilation: d; the k*d nearest are ranked and every d-th is kept.
        position: optional (1 or B, N, M) term added to the distance (the
            stored, already negated relative-position table).

    Returns:
        LongTensor (B, G, N, k) of source indices, nearest first.
    """
    batch, channels, num_dst = dst.shape
    num_src = src.shape[2]
    if channels % groups:
        raise ValueError(f"{channels} channels cannot be split into {groups} groups")
    if k * dilation > num_src:
        raise ValueError(f"k*dilation = {k}*{dilation} exceeds the {num_src} source nodes")
    with torch.no_grad():
        d = _unit(dst.reshape(batch, groups, channels // groups, num_dst)).transpose(2, 3)
        s = _unit(src.reshape(batch, groups, channels // groups, num_src)).transpose(2, 3)
        # squared euclidean distance ||d||^2 - 2 d.s + ||s||^2, summed in the
        # authors' order so that near-ties resolve the same way
        d_sq = (d * d).sum(-1, keepdim=True)  # (B, G, N, 1)
        s_sq = (s * s).sum(-1).unsqueeze(-2)  # (B, G, 1, M)
        dist = d_sq + (-2 * d @ s.transpose(2, 3)) + s_sq
        if position is not None:
            dist = dist + position.unsqueeze(1)
        nearest = torch.topk(-dist, k * dilation, dim=-1).indices
    return nearest[..., ::dilation]


def group_max_relative(dst, src, idx):
    """m_i = max over the neighbours j of (src_j - dst_i), per group.

    Args:
        dst: (B, C, N), src: (B, C, M) un-normalised features.
        idx: (B, G, N, K) source indices from :func:`group_knn`.

    Returns:
        (B, C, N) with the groups concatenated back in channel order.
    """
    batch, channels, num_dst = dst.shape
    groups = idx.shape[1]
    sub = channels // groups
    d = dst.reshape(batch, groups, sub, num_dst).transpose(2, 3)  # (B, G, N, c)
    s = src.reshape(batch, groups, sub, -1).transpose(2, 3)  # (B, G, M, c)
    b_ix = torch.arange(batch, device=idx.device).view(-1, 1, 1, 1)
    g_ix = torch.arange(groups, device=idx.device).view(1, -1, 1, 1)
    neighbours = s[b_ix, g_ix, idx]  # (B, G, N, K, c)
    rel = (neighbours - d.unsqueeze(3)).max(dim=3).values  # (B, G, N, c)
    return rel.transpose(2, 3).reshape(batch, channels, num_dst)


def interleave(a, b):
    """(B, C, N), (B, C, N) -> (B, 2C, N) ordered [a_0, b_0, a_1, b_1, ...]."""
    return torch.stack([a, b], dim=2).reshape(a.shape[0], 2 * a.shape[1], a.shape[2])


# ----------------------------------------------------------------------------
# Building blocks (attribute names = checkpoint key names)
# ----------------------------------------------------------------------------
def drop_path(x, rate, training):
    """Per-sample stochastic depth (timm's DropPath, scale_by_keep=True)."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


def conv_bn(c_in, c_out, kernel=1, stride=1, groups=1):
    """Sequential(Conv2d, BatchNorm2d): checkpoint keys ``.0.*`` and ``.1.*``."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups), nn.BatchNorm2d(c_out))


class Stem(nn.Module):
    """conv3x3/2 + BN + GELU, conv3x3/2 + BN + GELU, conv3x3 + BN: (B,3,H,W) -> (B,C0,H/4,W/4)."""

    def __init__(self, c0):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(3, c0 // 2, 3, 2, 1),
            nn.BatchNorm2d(c0 // 2),
            nn.GELU(),
            nn.Conv2d(c0 // 2, c0, 3, 2, 1),
            nn.BatchNorm2d(c0),
            nn.GELU(),
            nn.Conv2d(c0, c0, 3, 1, 1),
            nn.BatchNorm2d(c0),
        )

    def forward(self, x):
        return self.convs(x)


class Downsample(nn.Module):
    """conv3x3 stride 2 + BN between stages."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = conv_bn(c_in, c_out, kernel=3, stride=2)

    def forward(self, x):
        return self.conv(x)


class FFN(nn.Module):
    """x + droppath(BN(conv 4C->C)(GELU(BN(conv C->4C)(x)))) on (B, C, H, W)."""

    def __init__(self, channels, drop_rate):
        super().__init__()
        self.fc1 = conv_bn(channels, 4 * channels)
        self.act = nn.GELU()
        self.fc2 = conv_bn(4 * channels, channels)
        self.drop_rate = drop_rate

    def forward(self, x):
        return x + drop_path(self.fc2(self.act(self.fc1(x))), self.drop_rate, self.training)


class MaxRelativeConv(nn.Module):
    """Interleave [dst, max-relative] then conv1x1 2C->2C (groups=4) + BN + GELU."""

    def __init__(self, channels):
        super().__init__()
        self.nn = nn.Sequential(
            nn.Conv2d(2 * channels, 2 * channels, 1, groups=4), nn.BatchNorm2d(2 * channels), nn.GELU()
        )

    def forward(self, dst, src, idx):
        """dst (B, C, N), src (B, C, M), idx (B, G, N, K) -> (B, 2C, N, 1)."""
        rel = group_max_relative(dst, src, idx)
        return self.nn(interleave(dst, rel).unsqueeze(-1))


class GraphConv(nn.Module):
    """Holder so that the keys read ``graph_conv.gconv.nn.*``."""

    def __init__(self, channels):
        super().__init__()
        self.gconv = MaxRelativeConv(channels)


class Grapher(nn.Module):
    """Patch-level group KGCN block: x + droppath(BN(fc2)(gconv(BN(fc1)(x)))).

    ``table`` is the stage's stored relative-position term (1, n, n // r^2).
    """

    def __init__(self, channels, k, dilation, groups, r, table, drop_rate):
        super().__init__()
        self.fc1 = conv_bn(channels, channels)
        self.graph_conv = GraphConv(channels)
        self.fc2 = conv_bn(2 * channels, channels)
        self.relative_pos = nn.Parameter(table, requires_grad=False)
        self.k, self.dilation, self.groups, self.r, self.drop_rate = k, dilation, groups, r, drop_rate

    def forward(self, x):
        """(B, C, H, W) -> ((B, C, H, W), LongTensor (B, G, H*W, K) into the pooled grid)."""
        batch, channels, height, width = x.shape
        r = self.r
        num = height * width
        if (height // r) * (width // r) != num // (r * r):
            raise ValueError(
                f"stage grid {height}x{width} cannot be pooled by r={r} consistently with the relative-position table"
            )
        y = self.fc1(x)
        src = F.avg_pool2d(y, r, r) if r > 1 else y
        position = resize_relative_position(self.relative_pos, num, num // (r * r))
        dst_flat, src_flat = y.reshape(batch, channels, -1), src.reshape(batch, channels, -1)
        idx = group_knn(dst_flat, src_flat, self.k, self.groups, self.dilation, position)
        m = self.graph_conv.gconv(dst_flat, src_flat, idx).reshape(batch, 2 * channels, height, width)
        return x + drop_path(self.fc2(m), self.drop_rate, self.training), idx


class LabelGrapher(nn.Module):
    """Cross-level group KGCN: label nodes gather from all patch nodes, then an FFN.

    z = BN(fc1)(l); neighbours of z among the RAW stage-output patch features
    (no pooling, no position term, d = 1); l = l + droppath(BN(fc2)(gconv)); FFN.
    """

    def __init__(self, channels, k, groups, drop_rate):
        super().__init__()
        self.fc1 = conv_bn(channels, channels)
        self.graph_conv = GraphConv(channels)
        self.fc2 = conv_bn(2 * channels, channels)
        self.ffn = FFN(channels, drop_rate)
        self.k, self.groups, self.drop_rate = k, groups, drop_rate

    def forward(self, labels, patches):
        """labels (B, L, C), patches (B, C, H, W) -> ((B, L, C), LongTensor (B, G, L, K))."""
        batch, channels = patches.shape[:2]
        x = labels.transpose(1, 2).unsqueeze(-1)  # (B, C, L, 1)
        z = self.fc1(x).squeeze(-1)  # (B, C, L)
        src = patches.reshape(batch, channels, -1)
        idx = group_knn(z, src, self.k, self.groups, 1)
        x = x + drop_path(self.fc2(self.graph_conv.gconv(z, src, idx)), self.drop_rate, self.training)
        return self.ffn(x).squeeze(-1).transpose(1, 2), idx


class Backbone(nn.Module):
    """Pyramid ViG patch path with group kNN plus the label path (``backbone.*`` keys)."""

    def __init__(self, channels, blocks, num_classes, img_size, k, groups, num_gcn, cross_level, drop_path_rate):
        super().__init__()
        num_blocks = sum(blocks)
        rates = torch.linspace(0, drop_path_rate, num_blocks).tolist()
        max_dilation = 49 // k
        self.stem = Stem(channels[0])
        self.pos_embed = nn.Parameter(torch.zeros(1, channels[0], img_size // 4, img_size // 4))
        self.cross_level = cross_level
        if cross_level:
            self.label_lt = nn.Embedding(num_classes, channels[0])
            self.gcn_label = nn.ModuleList()
            self.ffn_label = nn.ModuleList()
        self.backbone = nn.ModuleList()
        self.stage_ends = []  # index in self.backbone of each stage's last block
        nodes = (img_size // 4) ** 2
        block_idx = 0
        for stage, (c, depth) in enumerate(zip(channels, blocks)):
            if cross_level:
                # the label module of a stage takes the rate of its first block
                repeats = num_gcn if stage == len(blocks) - 1 else 1
                self.gcn_label.append(
                    nn.ModuleList(LabelGrapher(c, k, groups, rates[block_idx]) for _ in range(repeats))
                )
                if stage < len(blocks) - 1:
                    self.ffn_label.append(nn.Sequential(nn.Linear(c, channels[stage + 1])))
            if stage > 0:
                self.backbone.append(Downsample(channels[stage - 1], c))
                nodes //= 4
            table = relative_position_table(c, nodes, REDUCE_RATIOS[stage])
            for _ in range(depth):
                dilation = min(block_idx // 4 + 1, max_dilation)
                self.backbone.append(
                    nn.Sequential(
                        Grapher(c, k, dilation, groups, REDUCE_RATIOS[stage], table.clone(), rates[block_idx]),
                        FFN(c, rates[block_idx]),
                    )
                )
                block_idx += 1
            self.stage_ends.append(len(self.backbone) - 1)

    def forward(self, images):
        """(B, 3, H, W) -> (labels (B, L, C3) or None, pooled (B, C3), per-stage edge dicts)."""
        x = self.stem(images)
        pos = self.pos_embed
        if pos.shape[-2:] != x.shape[-2:]:
            pos = F.interpolate(pos, size=x.shape[-2:], mode="bicubic", align_corners=False)
        x = x + pos
        labels = None
        if self.cross_level:
            labels = self.label_lt.weight.unsqueeze(0).expand(x.shape[0], -1, -1)
        edges, stage, patch_idx = [], 0, None
        for j, layer in enumerate(self.backbone):
            if isinstance(layer, Downsample):
                x = layer(x)
                continue
            x, patch_idx = layer[0](x)
            x = layer[1](x)
            if j != self.stage_ends[stage]:
                continue
            record = {"patch": patch_idx}
            if self.cross_level:
                for module in self.gcn_label[stage]:
                    labels, record["cross"] = module(labels, x)
                if stage < len(self.ffn_label):
                    labels = self.ffn_label[stage](labels)
            edges.append(record)
            stage += 1
        return labels, x.mean(dim=(2, 3)), edges


class Head(nn.Module):
    """Label logits diag(fc1(l)) + patch logits fc2(GAP): (B, L)."""

    def __init__(self, channels, num_classes, cross_level):
        super().__init__()
        if cross_level:
            self.fc1 = nn.Linear(channels, num_classes)
        self.fc2 = nn.Linear(channels, num_classes)
        self.cross_level = cross_level

    def forward(self, labels, pooled):
        logits = self.fc2(pooled)
        if self.cross_level:
            # the authors form the full (L x L) product and keep its diagonal
            logits = torch.diagonal(self.fc1(labels), dim1=1, dim2=2) + logits
        return logits


class ReferenceGKGNet(nn.Module):
    """Dense GKGNet.  ``forward(images) -> logits (B, num_classes)`` (pre-sigmoid).

    Args:
        variant: "ti", "s", "m" or "b" (Pyramid ViG widths/depths).
        num_classes: L, the number of label nodes.
        img_size: construction size S (pos_embed S/4 x S/4, relative tables).
        k: neighbours per destination and group (patch and cross level).
        groups: G channel groups of the group kNN.
        num_gcn: cross-level modules after the last stage.
        cross_level: False drops the label path (label_lt, gcn_label,
            ffn_label, head.fc1); logits are then the patch logits alone.
        drop_path: final stochastic-depth rate (linear over the patch blocks).
    """

    def __init__(
        self, variant="s", num_classes=80, img_size=224, k=9, groups=2, num_gcn=1, cross_level=True, drop_path=0.0
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
        channels, blocks = VARIANTS[variant]
        if num_classes < 1 or k < 1 or num_gcn < 1 or img_size < 4:
            raise ValueError(
                f"need num_classes, k, num_gcn >= 1 and img_size >= 4, got {num_classes}, {k}, {num_gcn}, {img_size}"
            )
        if (img_size // 4) % 8:
            raise ValueError(
                f"img_size={img_size}: img_size // 4 must be divisible by 8 so that "
                f"every stage's construction grid is square"
            )
        if groups < 1 or any(c % groups for c in channels):
            raise ValueError(f"groups={groups} does not divide the channels {channels}")
        self.num_classes = num_classes
        self.backbone = Backbone(channels, blocks, num_classes, img_size, k, groups, num_gcn, cross_level, drop_path)
        self.head = Head(channels[-1], num_classes, cross_level)
        self._init_weights()

    def _init_weights(self):
        """The authors' initialisation: kaiming-normal convs with zero bias,
        N(0, 1) label embeddings (nn.Embedding default), head N(0, 0.01)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.head.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, images, return_edges=False):
        """images (B, 3, H, W) -> logits (B, L); with ``return_edges`` also a
        list of 4 dicts: ``"patch"`` (B, G, N_stage, K) of the stage's last
        patch block (indices into its pooled source grid, row-major) and
        ``"cross"`` (B, G, L, K) into the stage's patch nodes (last repeat)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        labels, pooled, edges = self.backbone(images)
        logits = self.head(labels, pooled)
        return (logits, edges) if return_edges else logits


def trainable_parameter_count(model):
    """Number of trainable parameters (the relative tables are not trainable)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
