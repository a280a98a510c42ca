"""Training and test transforms (PIL RGB image -> normalised (3, S, S) tensor).

Training follows the authors' COCO recipe: CropMix with probability p
(else a plain bicubic resize to S x S), horizontal flip, colour jitter,
TrivialAugment (wide), normalisation and random erasing. Two deliberate
differences from the authors' mmcls pipeline:

* their CropMix draws the number of crops once per worker process (the
  first call overwrites its "2, 3 or 4" setting); here it is drawn on
  every call, as the CropMix paper and the config intend;
* random erasing runs last, on the normalised tensor, filling with
  per-pixel N(0, 1) noise (= mean + std * N(0, 1) in pixel units, the
  authors' fill); in their pipeline erasing precedes colour jitter and
  TrivialAugment, which then also alter the erased patch.

All randomness comes from torch's generator (which DataLoader seeds per
worker), and every transform is a module-level class, so the pipelines
pickle for worker processes.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from ..errors import CheckpointError

MEAN = (123.675 / 255.0, 116.28 / 255.0, 103.53 / 255.0)
STD = (58.395 / 255.0, 57.12 / 255.0, 57.375 / 255.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default aspect range


def cropmix_scales(num_crops: int, min_scale: float) -> list[tuple[float, float]]:
    """Area-scale range of each crop (the authors' CropMix).

    With n crops, crops 1..n-1 take consecutive 1/n slices of
    [min_scale, 1] (the first slices; n = 2 instead uses the whole range
    [min_scale, 1]), and the last crop is a near-full view (0.99, 1), so the
    mix always contains the whole image.
    """
    if num_crops == 2:
        return [(min_scale, 1.0), (0.99, 1.0)]
    step = (1.0 - min_scale) / num_crops
    return [(min_scale + k * step, min_scale + (k + 1) * step) for k in range(num_crops - 1)] + [(0.99, 1.0)]


class CropMix:
    """CropMix (Han et al. 2022) with mixup blending, as in GKGNet.

    Takes n random-resized crops of the image (n drawn uniformly from
    ``crops``; scales from ``cropmix_scales``; bilinear, as the authors'
    torchvision RandomResizedCrop), shuffles them and blends them one after
    another: ``mixed = lam * mixed + (1 - lam) * next`` with a fresh
    ``lam_j ~ Beta(mix_ratio / n, mix_ratio / n)`` per step j = 1..n-1.
    Shuffled crop 0 ends with weight prod_j lam_j and crop i >= 1 with
    (1 - lam_i) prod_{j > i} lam_j (expected 2^-(n-1), ..., 1/4, 1/2; the
    shuffle makes every crop equally likely in every position); the
    U-shaped Beta keeps most steps dominated by one of their two inputs.
    With ``channel_permute`` (the authors' "inter_aug", on by default) the
    lower-weighted input of each step has its RGB channels randomly
    permuted. Returns a PIL image of size (size, size).
    """

    def __init__(
        self,
        size: int,
        crops: Sequence[int] = (2, 3, 4),
        min_scale: float = 0.01,
        mix_ratio: float = 0.4,
        channel_permute: bool = True,
    ) -> None:
        if not crops or any(int(n) < 2 for n in crops):
            raise ValueError(f"CropMix crop counts must all be >= 2, got {tuple(crops)}")
        if not 0.0 < min_scale < 0.99:
            raise ValueError(f"CropMix min_scale must be in (0, 0.99), got {min_scale}")
        if mix_ratio <= 0.0:
            raise ValueError(f"CropMix mix_ratio must be > 0, got {mix_ratio}")
        self.size = int(size)
        self.crops = tuple(int(n) for n in crops)
        self.min_scale = float(min_scale)
        self.mix_ratio = float(mix_ratio)
        self.channel_permute = channel_permute

    def _crop(self, image: Image.Image, scale: tuple[float, float]) -> torch.Tensor:
        top, left, h, w = T.RandomResizedCrop.get_params(image, list(scale), list(CROP_RATIO))
        crop = TF.resized_crop(image, top, left, h, w, [self.size, self.size], InterpolationMode.BILINEAR)
        return TF.to_tensor(crop)

    def _mix(self, a: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
        if self.channel_permute:
            perm = torch.randperm(3)
            if lam > 0.5:
                b = b[perm]
            else:
                a = a[perm]
        return lam * a + (1.0 - lam) * b

    def __call__(self, image: Image.Image) -> Image.Image:
        n = self.crops[int(torch.randint(len(self.crops), ()))]
        views = [self._crop(image, scale) for scale in cropmix_scales(n, self.min_scale)]
        views = [views[i] for i in torch.randperm(n).tolist()]
        # float64: with concentrations ~0.1 float32 gamma draws can underflow.
        alpha = torch.tensor(self.mix_ratio / n, dtype=torch.float64)
        beta = torch.distributions.Beta(alpha, alpha)
        mixed = views[0]
        for view in views[1:]:
            mixed = self._mix(mixed, view, float(beta.sample()))
        # Round (to_pil_image would truncate) back to an 8-bit PIL image for
        # the PIL-based augmentations that follow.
        pixels = (mixed.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
        return Image.fromarray(pixels.permute(1, 2, 0).numpy())

    def __repr__(self) -> str:
        return (
            f"CropMix(size={self.size}, crops={self.crops}, min_scale={self.min_scale}, "
            f"mix_ratio={self.mix_ratio}, channel_permute={self.channel_permute})"
        )


class CropMixOrResize:
    """With probability p CropMix, else a bicubic resize to (size, size)."""

    def __init__(self, cropmix: CropMix, p: float) -> None:
        _check_prob("cropmix_prob", p)
        self.cropmix = cropmix
        self.p = float(p)

    def __call__(self, image: Image.Image) -> Image.Image:
        if float(torch.rand(())) < self.p:
            return self.cropmix(image)
        size = self.cropmix.size
        return TF.resize(image, [size, size], InterpolationMode.BICUBIC)

    def __repr__(self) -> str:
        return f"CropMixOrResize(p={self.p}, {self.cropmix!r})"


def _check_prob(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")


def _check_size(img_size: int) -> None:
    if int(img_size) != img_size or img_size < 1:
        raise ValueError(f"img_size must be a positive integer, got {img_size}")


def build_train_transform(
    img_size: int,
    cropmix_prob: float = 0.5,
    cropmix_crops: Sequence[int] = (2, 3, 4),
    cropmix_min_scale: float = 0.01,
    cropmix_mix_ratio: float = 0.4,
    hflip: float = 0.5,
    color_jitter: float = 0.4,
    trivial_augment: bool = True,
    random_erasing: float = 0.5,
    cropmix_channel_permute: bool = True,
) -> T.Compose:
    """PIL RGB image -> (3, img_size, img_size) normalised float tensor.

    A zero probability / strength (or trivial_augment=False) leaves that
    step out.
    """
    _check_size(img_size)
    for name, p in (("hflip", hflip), ("random_erasing", random_erasing)):
        _check_prob(name, p)
    if color_jitter < 0.0:
        raise ValueError(f"color_jitter must be >= 0, got {color_jitter}")
    cropmix = CropMix(img_size, cropmix_crops, cropmix_min_scale, cropmix_mix_ratio, cropmix_channel_permute)
    steps = [CropMixOrResize(cropmix, cropmix_prob)]
    if hflip > 0.0:
        steps.append(T.RandomHorizontalFlip(hflip))
    if color_jitter > 0.0:
        steps.append(T.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    if trivial_augment:
        steps.append(T.TrivialAugmentWide())
    steps += [T.ToTensor(), T.Normalize(MEAN, STD)]
    if random_erasing > 0.0:
        steps.append(T.RandomErasing(p=random_erasing, scale=(0.02, 1.0 / 3.0), value="random"))
    return T.Compose(steps)


def build_test_transform(img_size: int, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> T.Compose:
    """Bicubic resize to (img_size, img_size), ToTensor, normalise (mean and
    std on the 0-1 scale)."""
    _check_size(img_size)
    return T.Compose(
        [
            T.Resize((img_size, img_size), interpolation=InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(tuple(mean), tuple(std)),
        ]
    )


def preprocess_info(
    img_size: int, mean: Sequence[float] = MEAN, std: Sequence[float] = STD, crop_pct: Optional[float] = None
) -> dict:
    """What the evaluation transform does, as stored in checkpoints (entry
    ``preprocess``) so that predict.py and exported models need nothing else:
    decode to 8-bit RGB (``gkg_pyg.data.load_rgb``), then either resize to
    (img_size, img_size) bicubically (``build_test_transform``, multi-label) or,
    with ``crop_pct``, resize the shorter side to ``img_size / crop_pct`` and
    crop the centre ``img_size`` square (timm's evaluation transform, the
    single-label task); scale to 0-1, subtract ``mean``, divide by ``std``
    (both on the 0-1 scale, RGB order)."""
    _check_size(img_size)
    info = {"img_size": int(img_size), "resize": "bicubic", "mean": list(mean), "std": list(std)}
    if crop_pct is not None:
        info.update(resize="bicubic_center_crop", crop_pct=float(crop_pct))
    return info


def preprocess_for_config(cfg: dict) -> dict:
    """The :func:`preprocess_info` record of a config's evaluation transform
    (the single-label task: timm's resize + centre crop with the model's
    ``pretrained_cfg`` normalisation)."""
    if cfg.get("task") == "single_label":
        from .single_label import single_label_normalisation

        mean, std = single_label_normalisation(cfg["model"]["name"])
        return preprocess_info(cfg["model"]["img_size"], mean, std, cfg["single_label"]["eval_crop_pct"])
    return preprocess_info(cfg["model"]["img_size"])


def checkpoint_preprocess(checkpoint: dict, cfg: dict) -> dict:
    """A trained checkpoint's ``preprocess`` entry, or :func:`preprocess_for_config`
    where it has none, or where a single-label checkpoint written before the
    entry knew the task stored the multi-label transform."""
    stored = checkpoint.get("preprocess")
    if stored is None or (cfg.get("task") == "single_label" and "crop_pct" not in stored):
        return preprocess_for_config(cfg)
    return dict(stored)


def transform_from_preprocess(info: dict) -> T.Compose:
    """The evaluation transform a ``preprocess_info`` record describes."""
    if info.get("resize", "bicubic") == "bicubic_center_crop":
        from .single_label import single_label_transform

        options = {"eval_crop_pct": info["crop_pct"]}
        return single_label_transform(int(info["img_size"]), False, info["mean"], info["std"], options)
    if info.get("resize", "bicubic") != "bicubic":
        raise CheckpointError(f"unsupported resize {info['resize']!r} in the checkpoint's preprocess entry")
    return build_test_transform(int(info["img_size"]), info["mean"], info["std"])
