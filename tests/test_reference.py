"""Sanity tests of the dense reference GKGNet (tests/reference_gkgnet.py)."""

import pytest
import torch
from torch.nn import functional as F

from reference_gkgnet import (
    ReferenceGKGNet,
    drop_path,
    group_knn,
    group_max_relative,
    interleave,
    relative_position_table,
    resize_relative_position,
    trainable_parameter_count,
)

NUM_LABELS = 5


@pytest.fixture(scope="module")
def tiny():
    """GKGNet-Ti built at 192 (smallest square size whose last stage holds K*d = 27 nodes)."""
    torch.manual_seed(0)
    return ReferenceGKGNet("ti", num_classes=NUM_LABELS, img_size=192)


def expected_checkpoint_shapes(channels, blocks, num_classes, img_size, num_gcn=1):
    """The authors' mmcls key -> shape map, written out from the checkpoint layout."""

    def bn(prefix, c):
        return {
            f"{prefix}.weight": (c,),
            f"{prefix}.bias": (c,),
            f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,),
            f"{prefix}.num_batches_tracked": (),
        }

    def conv(prefix, c_out, c_in, kernel=1):
        return {f"{prefix}.weight": (c_out, c_in, kernel, kernel), f"{prefix}.bias": (c_out,)}

    def grapher_core(prefix, c):  # fc1, graph_conv.gconv.nn, fc2
        out = {**conv(f"{prefix}.fc1.0", c, c), **bn(f"{prefix}.fc1.1", c)}
        out.update(
            {
                **conv(f"{prefix}.graph_conv.gconv.nn.0", 2 * c, 2 * c // 4),
                **bn(f"{prefix}.graph_conv.gconv.nn.1", 2 * c),
            }
        )
        out.update({**conv(f"{prefix}.fc2.0", c, 2 * c), **bn(f"{prefix}.fc2.1", c)})
        return out

    def ffn(prefix, c):
        return {
            **conv(f"{prefix}.fc1.0", 4 * c, c),
            **bn(f"{prefix}.fc1.1", 4 * c),
            **conv(f"{prefix}.fc2.0", c, 4 * c),
            **bn(f"{prefix}.fc2.1", c),
        }

    c0, side = channels[0], img_size // 4
    shapes = {
        **conv("backbone.stem.convs.0", c0 // 2, 3, 3),
        **bn("backbone.stem.convs.1", c0 // 2),
        **conv("backbone.stem.convs.3", c0, c0 // 2, 3),
        **bn("backbone.stem.convs.4", c0),
        **conv("backbone.stem.convs.6", c0, c0, 3),
        **bn("backbone.stem.convs.7", c0),
        "backbone.pos_embed": (1, c0, side, side),
        "backbone.label_lt.weight": (num_classes, c0),
        "head.fc1.weight": (num_classes, channels[-1]),
        "head.fc1.bias": (num_classes,),
        "head.fc2.weight": (num_classes, channels[-1]),
        "head.fc2.bias": (num_classes,),
    }
    j, nodes = 0, side * side
    for s, (c, depth, r) in enumerate(zip(channels, blocks, (4, 2, 1, 1))):
        if s > 0:
            shapes.update(
                {
                    **conv(f"backbone.backbone.{j}.conv.0", c, channels[s - 1], 3),
                    **bn(f"backbone.backbone.{j}.conv.1", c),
                }
            )
            j, nodes = j + 1, nodes // 4
        for _ in range(depth):
            shapes.update(grapher_core(f"backbone.backbone.{j}.0", c))
            shapes[f"backbone.backbone.{j}.0.relative_pos"] = (1, nodes, nodes // (r * r))
            shapes.update(ffn(f"backbone.backbone.{j}.1", c))
            j += 1
        for rep in range(num_gcn if s == 3 else 1):
            shapes.update(grapher_core(f"backbone.gcn_label.{s}.{rep}", c))
            shapes.update(ffn(f"backbone.gcn_label.{s}.{rep}.ffn", c))
        if s < 3:
            shapes[f"backbone.ffn_label.{s}.0.weight"] = (channels[s + 1], c)
            shapes[f"backbone.ffn_label.{s}.0.bias"] = (channels[s + 1],)
    return shapes


def test_published_parameter_counts_and_checkpoint_layout():
    """33.265 M at 224 and 34.018 M at 448 (paper, relative tables excluded);
    the state dict is exactly the authors' mmcls layout."""
    model = ReferenceGKGNet("s", num_classes=80, img_size=224)
    assert round(trainable_parameter_count(model) / 1e6, 3) == 33.265
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_checkpoint_shapes((80, 160, 400, 640), (2, 2, 6, 2), 80, 224)
    assert got["backbone.gcn_label.3.0.graph_conv.gconv.nn.0.weight"] == (1280, 320, 1, 1)
    assert got["backbone.backbone.0.0.relative_pos"] == (1, 3136, 196)
    del model
    model = ReferenceGKGNet("s", num_classes=80, img_size=448)
    assert round(trainable_parameter_count(model) / 1e6, 3) == 34.018


def test_num_gcn_and_no_cross_level_layout():
    model = ReferenceGKGNet("ti", num_classes=3, img_size=192, num_gcn=2)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_checkpoint_shapes((48, 96, 240, 384), (2, 2, 6, 2), 3, 192, num_gcn=2)
    plain = ReferenceGKGNet("ti", num_classes=3, img_size=192, cross_level=False)
    keys = set(plain.state_dict())
    assert not any("label" in k or k.startswith("head.fc1") for k in keys)
    assert "head.fc2.weight" in keys


def test_invalid_arguments():
    with pytest.raises(ValueError, match="variant"):
        ReferenceGKGNet("xl")
    with pytest.raises(ValueError, match="img_size"):
        ReferenceGKGNet("ti", img_size=200)
    with pytest.raises(ValueError, match="groups"):
        ReferenceGKGNet("ti", img_size=192, groups=7)


def test_relative_table_is_sincos_product():
    """Closed form == 2 P P^T / C of an explicit MAE sine-cosine embedding,
    resampled by one bicubic call over the whole table, negated."""
    channels, grid, r = 24, 8, 2
    quarter = channels // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    emb = torch.zeros(grid * grid, channels, dtype=torch.float64)
    for row in range(grid):
        for col in range(grid):
            # first half encodes the column, second half the row
            halves = [torch.cat([torch.sin(p * omega), torch.cos(p * omega)]) for p in (col, row)]
            emb[row * grid + col] = torch.cat(halves)
    table = (2 * emb @ emb.T / channels).float()
    want = -F.interpolate(
        table[None, None], size=(grid * grid, grid * grid // (r * r)), mode="bicubic", align_corners=False
    )[0]
    got = relative_position_table(channels, grid * grid, r)
    assert got.shape == (1, 64, 16) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # chunking rows does not change a single bit; r = 1 keeps the raw table
    assert torch.equal(
        relative_position_table(channels, 64, r, rows_per_chunk=8),
        relative_position_table(channels, 64, r, rows_per_chunk=64),
    )
    torch.testing.assert_close(relative_position_table(channels, 64, 1)[0], -table, rtol=0, atol=1e-6)
    # nearer positions get a larger T, i.e. a smaller (more negative) stored term
    raw = -relative_position_table(channels, 64, 1)[0]
    assert raw[0, 0] > raw[0, 1] > raw[0, 7] and torch.allclose(raw[0, 0], torch.tensor(1.0))


def test_resize_relative_position():
    table = torch.randn(1, 12, 3)
    assert resize_relative_position(table, 12, 3) is table
    want = F.interpolate(table[None], size=(20, 5), mode="bicubic", align_corners=False)[0]
    assert torch.equal(resize_relative_position(table, 20, 5), want)


def brute_force_knn(dst, src, k, groups, dilation, position):
    """Double loop over destinations and sources with explicit differences."""
    batch, channels, num_dst = dst.shape
    sub = channels // groups
    out = torch.empty(batch, groups, num_dst, k, dtype=torch.long)
    for b in range(batch):
        for g in range(groups):
            for i in range(num_dst):
                u = dst[b, g * sub : (g + 1) * sub, i]
                u = u / u.norm()
                dists = []
                for j in range(src.shape[2]):
                    v = src[b, g * sub : (g + 1) * sub, j]
                    v = v / v.norm()
                    extra = 0.0 if position is None else float(position[0, i, j])
                    dists.append((float(((u - v) ** 2).sum()) + extra, j))
                ranked = [j for _, j in sorted(dists)]
                out[b, g, i] = torch.tensor(ranked[: k * dilation : dilation])
    return out


@pytest.mark.parametrize("dilation,with_position", [(1, False), (2, True), (3, True)])
def test_group_knn_matches_brute_force(dilation, with_position):
    gen = torch.Generator().manual_seed(dilation)
    dst = torch.randn(2, 6, 7, generator=gen, dtype=torch.float64)
    src = torch.randn(2, 6, 15, generator=gen, dtype=torch.float64)
    position = torch.randn(1, 7, 15, generator=gen, dtype=torch.float64) if with_position else None
    got = group_knn(dst, src, 4, 3, dilation, position)
    assert got.dtype == torch.long and got.shape == (2, 3, 7, 4)
    assert torch.equal(got, brute_force_knn(dst, src, 4, 3, dilation, position))
    with pytest.raises(ValueError, match="exceeds"):
        group_knn(dst, src, 8, 3, 2)


def test_group_max_relative_and_interleave():
    gen = torch.Generator().manual_seed(3)
    dst = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64)
    src = torch.randn(2, 4, 6, generator=gen, dtype=torch.float64)
    idx = torch.randint(0, 6, (2, 2, 5, 3), generator=gen)
    got = group_max_relative(dst, src, idx)
    want = torch.empty_like(dst)
    for b in range(2):
        for c in range(4):
            g = c // 2
            for i in range(5):
                want[b, c, i] = max(src[b, c, j] - dst[b, c, i] for j in idx[b, g, i].tolist())
    assert torch.equal(got, want)
    a, m = torch.tensor([[[1.0], [2.0]]]), torch.tensor([[[10.0], [20.0]]])
    assert interleave(a, m).flatten().tolist() == [1.0, 10.0, 2.0, 20.0]


def test_drop_path_is_per_sample():
    x = torch.ones(4000, 3, 2, 1)
    assert drop_path(x, 0.25, training=False) is x
    y = drop_path(x, 0.25, training=True)
    per_sample = y.reshape(4000, -1)
    assert ((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1)).all()
    assert 0.2 < (per_sample[:, 0] == 0).float().mean() < 0.3


def check_edges(edges, batch, grids, num_labels):
    """Per stage: patch (B, G, H*W, 9) into the pooled grid, cross (B, G, L, 9)."""
    assert len(edges) == 4
    for (h, w), r, record in zip(grids, (4, 2, 1, 1), edges):
        patch, cross = record["patch"], record["cross"]
        assert patch.dtype == torch.long and patch.shape == (batch, 2, h * w, 9)
        assert 0 <= patch.min() and patch.max() < (h // r) * (w // r)
        assert cross.dtype == torch.long and cross.shape == (batch, 2, num_labels, 9)
        assert 0 <= cross.min() and cross.max() < h * w
        # the K neighbours of a destination in a group are distinct
        assert (patch.sort(-1).values.diff(dim=-1) > 0).all()


@pytest.mark.parametrize(
    "dtype,train,size",
    [
        (torch.float32, True, (192, 192)),
        (torch.float64, False, (192, 160)),
    ],
)
def test_forward_shapes(tiny, dtype, train, size):
    model = tiny.to(dtype).train(train)
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1)).to(dtype)
    logits, edges = model(images, return_edges=True)
    assert logits.shape == (2, NUM_LABELS) and logits.dtype == dtype
    assert torch.isfinite(logits).all()
    h, w = size[0] // 4, size[1] // 4
    check_edges(edges, 2, [(h, w), (h // 2, w // 2), (h // 4, w // 4), (h // 8, w // 8)], NUM_LABELS)
    if not train:
        # eval: no cross-image interaction, so one image alone gives its own logits
        torch.testing.assert_close(model(images[:1]), logits[:1], rtol=1e-10, atol=1e-10)


def test_train_backward_and_too_small_input(tiny):
    model = tiny.float().train()
    logits = model(torch.randn(2, 3, 160, 192))
    logits.sum().backward()
    assert model.backbone.label_lt.weight.grad is not None
    assert model.backbone.pos_embed.grad.shape == model.backbone.pos_embed.shape
    assert model.backbone.backbone[0][0].relative_pos.grad is None
    model.zero_grad()
    with pytest.raises(ValueError, match="exceeds"):
        model(torch.randn(1, 3, 128, 128))
