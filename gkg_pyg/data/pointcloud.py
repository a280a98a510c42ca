"""Point-cloud classification data: a built-in synthetic data set of
parametric shapes, and ModelNet10/40 through PyG's loader when the files
are there.

The synthetic shapes are surfaces sampled uniformly by area (up to the small
distortion of the bumps and waves), with Gaussian noise, a random rotation
(uniform over SO(3)) and a random isotropic scale, then centred and scaled
into the unit ball (PyG's ``NormalizeScale`` scales the largest coordinate to 1
instead), so that neither the pose nor the size tells the classes apart. Four pairs of classes share their
overall form and differ in local geometry only:

=====  ====================  =================================================
class  shape                 its local twin
=====  ====================  =================================================
0, 1   sphere                sphere with bumps (radius 1 + 0.15 sin 5x sin 5y sin 5z)
2, 3   cube surface          octahedron surface (flat faces, other edges and corners)
4, 5   cylinder with caps    cone with base
6, 7   torus (R 1, r 0.4)    torus whose tube radius waves 6 times around the ring
=====  ====================  =================================================

Every cloud is a function of ``(seed, split, index)`` alone, so a data set
is the same whatever the order in which it is read.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, List, Optional

import torch
from torch import Tensor
from torch_geometric.data import Data

from ..errors import MissingFileError, UsageError

__all__ = ["MODELNET10_CLASSES", "SHAPE_CLASSES", "SyntheticShapes", "load_modelnet", "sample_shape"]

SHAPE_CLASSES = ("sphere", "bumpy_sphere", "cube", "octahedron", "cylinder", "cone", "torus", "wavy_torus")
_SPLIT_OFFSET = {"train": 0, "test": 1}
# The class folders PyG's ModelNet loader checks under raw/ (for ModelNet40 too).
MODELNET10_CLASSES = ("bathtub", "bed", "chair", "desk", "dresser", "monitor", "night_stand", "sofa", "table", "toilet")


def _unit_vectors(n: int, gen: torch.Generator) -> Tensor:
    return torch.nn.functional.normalize(torch.randn(n, 3, generator=gen, dtype=torch.float64), dim=1)


def _uniform(n: int, gen: torch.Generator, low: float = 0.0, high: float = 1.0) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)


def _torus(n: int, gen: torch.Generator, waves: int) -> Tensor:
    """Torus with ring radius 1 and tube radius 0.4 (x (1 + 0.3 sin(waves phi)) when waves > 0),
    sampled by area with rejection (the surface element grows with the distance from the axis)."""
    big, small = 1.0, 0.4
    out: List[Tensor] = []
    count = 0
    while count < n:
        phi, theta = _uniform(2 * n, gen, 0, 2 * math.pi), _uniform(2 * n, gen, 0, 2 * math.pi)
        r = small * (1 + 0.3 * torch.sin(waves * phi)) if waves else torch.full_like(phi, small)
        ring = big + r * torch.cos(theta)
        keep = _uniform(2 * n, gen) * (big + small * 1.3) < ring
        pts = torch.stack([ring * torch.cos(phi), ring * torch.sin(phi), r * torch.sin(theta)], dim=1)[keep]
        out.append(pts)
        count += len(pts)
    return torch.cat(out)[:n]


def _solid_of_revolution(n: int, gen: torch.Generator, cone: bool) -> Tensor:
    """Cylinder (radius 1, height 2, both caps) or cone (base radius 1, height 2, base), by area."""
    side = math.pi * math.sqrt(5.0) if cone else 4 * math.pi  # lateral areas: pi r l, 2 pi r h
    caps = math.pi if cone else 2 * math.pi
    on_side = _uniform(n, gen) < side / (side + caps)
    phi = _uniform(n, gen, 0, 2 * math.pi)
    t = _uniform(n, gen)
    if cone:  # lateral radius shrinks linearly to the apex: density ~ radius -> radius = sqrt(u)
        radius = torch.where(on_side, torch.sqrt(t), torch.sqrt(_uniform(n, gen)))
        z = torch.where(on_side, 2 * (1 - radius) - 1, torch.full_like(t, -1.0))
    else:
        radius = torch.where(on_side, torch.ones_like(t), torch.sqrt(_uniform(n, gen)))
        cap_z = torch.where(_uniform(n, gen) < 0.5, -1.0, 1.0)
        z = torch.where(on_side, 2 * t - 1, cap_z)
    return torch.stack([radius * torch.cos(phi), radius * torch.sin(phi), z], dim=1)


def sample_shape(label: int, num_points: int, gen: torch.Generator) -> Tensor:
    """``(num_points, 3)`` float64 points on the surface of shape ``label``
    (canonical pose and size, no noise)."""
    n = num_points
    name = SHAPE_CLASSES[label]
    if name in ("sphere", "bumpy_sphere"):
        u = _unit_vectors(n, gen)
        if name == "sphere":
            return u
        bumps = torch.sin(5 * u[:, 0]) * torch.sin(5 * u[:, 1]) * torch.sin(5 * u[:, 2])
        return u * (1 + 0.15 * bumps).unsqueeze(1)
    if name == "cube":  # a face (axis, side), then a uniform point on it
        pts = _uniform(3 * n, gen, -1, 1).view(n, 3)
        axis = torch.randint(3, (n,), generator=gen)
        side = torch.where(_uniform(n, gen) < 0.5, -1.0, 1.0).to(torch.float64)
        pts[torch.arange(n), axis] = side
        return pts
    if name == "octahedron":  # |x| + |y| + |z| = 1: a uniform point of the simplex, random signs
        w = -torch.log(_uniform(3 * n, gen).clamp_min(1e-12)).view(n, 3)
        signs = torch.where(_uniform(3 * n, gen) < 0.5, -1.0, 1.0).view(n, 3).to(torch.float64)
        return w / w.sum(1, keepdim=True) * signs
    if name in ("cylinder", "cone"):
        return _solid_of_revolution(n, gen, cone=name == "cone")
    return _torus(n, gen, waves=6 if name == "wavy_torus" else 0)


def _random_rotation(gen: torch.Generator) -> Tensor:
    """Uniform over SO(3): QR of a Gaussian matrix with the signs fixed."""
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


class SyntheticShapes(torch.utils.data.Dataset):
    """The built-in synthetic point-cloud data set (classes in :data:`SHAPE_CLASSES`).

    Args:
        split: ``"train"`` or ``"test"`` (different clouds for the same seed).
        num_per_class: clouds per class.
        num_points: points per cloud.
        noise: standard deviation of the Gaussian noise, relative to the shape's size.
        seed: the data set's seed.
        transform: applied to each :class:`~torch_geometric.data.Data`.

    Each item is ``Data(pos=(num_points, 3) float32, y=(1,) long)``; the
    clouds are generated once, at construction.
    """

    def __init__(
        self,
        split: str = "train",
        num_per_class: int = 50,
        num_points: int = 256,
        noise: float = 0.01,
        seed: int = 0,
        transform: Optional[Callable[[Data], Data]] = None,
    ):
        if split not in _SPLIT_OFFSET:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if num_per_class < 1 or num_points < 1:
            raise ValueError(f"num_per_class and num_points must be positive, got {num_per_class}, {num_points}")
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.split, self.num_points, self.noise, self.seed = split, num_points, noise, seed
        self.num_classes, self.classes = len(SHAPE_CLASSES), list(SHAPE_CLASSES)
        self.transform = transform
        self.data: List[Data] = []
        for index in range(num_per_class * self.num_classes):
            label = index % self.num_classes
            gen = torch.Generator().manual_seed((seed * 2 + _SPLIT_OFFSET[split]) * 1_000_003 + index)
            pos = sample_shape(label, num_points, gen)
            pos = pos + noise * torch.randn(pos.shape, generator=gen, dtype=torch.float64)
            pos = pos @ _random_rotation(gen).T * float(_uniform(1, gen, 0.7, 1.3))
            pos = pos - pos.mean(0, keepdim=True)  # centre, then into the unit ball
            pos = pos / pos.norm(dim=1).max()
            self.data.append(Data(pos=pos.float(), y=torch.tensor([label])))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Data:
        data = self.data[index]
        return self.transform(data) if self.transform is not None else data

    def __repr__(self) -> str:
        return (
            f"SyntheticShapes(split={self.split!r}, clouds={len(self)}, classes={self.num_classes}, "
            f"points={self.num_points}, noise={self.noise}, seed={self.seed})"
        )


def load_modelnet(root: str | os.PathLike, name: str = "10", train: bool = True, num_points: int = 1024):
    """ModelNet10 or ModelNet40 through :class:`torch_geometric.datasets.ModelNet`
    (``NormalizeScale`` once, ``SamplePoints(num_points)`` per access, as PyG's DGCNN example).

    ``root`` must hold the unpacked archive PyG's way, ``root/raw/<class>/{train,test}/<class>_*.off``
    (``ModelNet10.zip`` / ``ModelNet40.zip`` from modelnet.cs.princeton.edu, its top folder renamed
    ``raw``); the first call writes ``root/processed/``. Nothing is downloaded: PyG would download
    whenever one of ModelNet10's class folders is missing from ``raw/`` (it checks those ten for both
    data sets), so that is a ``FileNotFoundError`` here that says where the files go.
    """
    from torch_geometric import transforms as T
    from torch_geometric.datasets import ModelNet

    if name not in ("10", "40"):
        raise UsageError(f"ModelNet name must be '10' or '40', got {name!r}")
    raw = Path(root) / "raw"
    missing = [c for c in MODELNET10_CLASSES if not (raw / c).is_dir()]
    if missing:
        raise MissingFileError(
            f"ModelNet{name} not found under {root}: {raw} lacks the class folders {missing[:4]}"
            f"{' ...' if len(missing) > 4 else ''} (expected the unpacked ModelNet{name}.zip as {raw}/<class>/"
            "{train,test}/<class>_*.off). Nothing is downloaded here."
        )
    return ModelNet(str(root), name, train, transform=T.SamplePoints(num_points), pre_transform=T.NormalizeScale())
