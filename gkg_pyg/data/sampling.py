"""Class-balanced oversampling by repeat factors (LVIS; mmdet / mmcls
ClassBalancedDataset, which the GKGNet COCO config uses with threshold 0.01).
"""

from __future__ import annotations

import math

import torch


def repeat_factors(targets: torch.Tensor, threshold: float = 0.01) -> torch.Tensor:
    """Per-image repeat factor r_i, a (N,) float64 tensor.

    f_c = fraction of the N images in which class c is present (target == 1;
    difficult-only labels (-1) count as absent, like mmcls' get_cat_ids),
    r_c = max(1, sqrt(threshold / f_c)), r_i = max of r_c over the image's
    present classes, 1 for an image without any.

    Args:
        targets: (N, L) labels, 1 present, 0 absent, -1 difficult-only.
        threshold: frequency below which a class is oversampled.
    """
    targets = torch.as_tensor(targets)
    if targets.dim() != 2 or targets.shape[0] == 0:
        raise ValueError(f"targets must be a non-empty (N, L) matrix, got shape {tuple(targets.shape)}")
    if threshold <= 0.0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    present = targets == 1
    freq = present.double().mean(dim=0)  # (L,)
    class_factor = torch.ones_like(freq)
    seen = freq > 0
    class_factor[seen] = torch.sqrt(threshold / freq[seen]).clamp(min=1.0)
    # Absent classes contribute 1, the floor of every factor, so the max
    # over all classes equals the max over present ones (or 1 for none).
    return torch.where(present, class_factor, torch.ones_like(class_factor)).amax(dim=1)


def repeat_factor_indices(targets: torch.Tensor, threshold: float = 0.01) -> list[int]:
    """Dataset indices with image i repeated ceil(r_i) times, in order
    (mmdet's ClassBalancedDataset); shuffle them with the sampler.

    Args:
        targets: (N, L) labels as in ``repeat_factors``.
    Returns:
        list of sum_i ceil(r_i) indices into the data set.
    """
    factors = repeat_factors(targets, threshold)
    indices = []
    for i, r in enumerate(factors.tolist()):
        indices.extend([i] * math.ceil(r))
    return indices
