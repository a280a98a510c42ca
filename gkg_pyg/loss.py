"""GKGNet training loss: label-smoothed BCE + 10 x asymmetric loss.

Both parts are summed over classes and averaged over the batch, as in the
authors' ``LabelQueryHead`` (mmcls losses called with ``avg_factor=batch``).
Targets use the shared convention 1 / 0 / -1 (-1: present only through
"difficult" objects); in training -1 counts as positive.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    # fp16/bf16 logs and sigmoids lose too much; float64 stays float64 (used by gradcheck).
    return x if x.dtype == torch.float64 else x.float()


def _check(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, L), got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} differs from logits shape {tuple(logits.shape)}")
    if ((targets != 0) & (targets != 1) & (targets != -1)).any():
        bad = torch.unique(targets[(targets != 0) & (targets != 1) & (targets != -1)])[:5]
        raise ValueError(f"targets must only hold 1, 0 or -1; found {bad.tolist()}")


def smoothed_bce_loss(logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    """BCE-with-logits on targets smoothed to 1 - smoothing / smoothing.

    Matches mmcls ``LabelSmoothLoss(mode='multi_label')`` with
    ``label_smooth_val=smoothing``.

    Args:
        logits: (B, L), any float dtype (computed in float32, or float64 if given).
        targets: (B, L) in {1, 0, -1}; nonzero counts as positive.
    Returns:
        scalar: summed over classes, averaged over the batch.
    """
    positive = targets != 0
    logits = _at_least_fp32(logits)
    soft = torch.where(positive, 1.0 - smoothing, smoothing).to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, soft, reduction="none")
    return loss.sum() / logits.shape[0]


def _focus(base: torch.Tensor, gamma: float) -> torch.Tensor:
    # gamma == 0 means no focusing; skipping pow also avoids 0 ** -1 in its backward.
    return torch.ones_like(base) if gamma == 0 else base.pow(gamma)


def asymmetric_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    gamma_pos: float = 0.0,
    gamma_neg: float = 2.0,
    clip: float = 0.05,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Asymmetric loss (Ridnik et al., ICCV 2021), the mmcls formula.

    With p = sigmoid(logit):
      positive: p_t = p,                      loss = -(1 - p_t)^gamma_pos * log(max(p_t, eps))
      negative: p_t = min(1 - p + clip, 1),   loss = -(1 - p_t)^gamma_neg * log(max(p_t, eps))
    (for negatives 1 - p_t = max(p - clip, 0) is the shifted probability).
    The focusing weight (1 - p_t)^gamma keeps its gradient: the authors' mmcls
    ``asymmetric_loss`` has no detach (no ``disable_grad_focal`` option).

    Args:
        logits: (B, L), any float dtype (computed in float32, or float64 if given).
        targets: (B, L) in {1, 0, -1}; nonzero counts as positive.
    Returns:
        scalar: summed over classes, averaged over the batch.
    """
    prob = torch.sigmoid(_at_least_fp32(logits))
    positive = targets != 0
    neg_pt = 1.0 - prob
    if clip > 0:
        neg_pt = (neg_pt + clip).clamp(max=1.0)
    pos_loss = -_focus(1.0 - prob, gamma_pos) * torch.log(prob.clamp(min=eps))
    neg_loss = -_focus(1.0 - neg_pt, gamma_neg) * torch.log(neg_pt.clamp(min=eps))
    loss = torch.where(positive, pos_loss, neg_loss)
    return loss.sum() / logits.shape[0]


class GKGNetLoss(nn.Module):
    """bce_weight x smoothed BCE + asl_weight x asymmetric loss (authors' COCO/VOC config).

    The authors (``LabelQueryHead.forward_train``) report the two parts as
    ``bce_loss`` and ``asy_loss`` (ASL already x10) and train on their sum.
    Their head computes ``abs(gt_label)`` but passes the raw labels on, so a
    -1 would be a negative in their BCE; here -1 is a positive in both parts,
    as the shared target convention asks (COCO has no -1 labels).

    Forward: logits (B, L), targets (B, L) in {1, 0, -1} -> scalar float32.
    Autocast-safe: both parts are computed in float32.
    """

    def __init__(
        self,
        bce_weight: float = 1.0,
        asl_weight: float = 10.0,
        label_smoothing: float = 0.1,
        gamma_pos: float = 0.0,
        gamma_neg: float = 2.0,
        clip: float = 0.05,
        eps: float = 1e-8,
    ):
        super().__init__()
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        if gamma_pos < 0 or gamma_neg < 0:
            raise ValueError(f"gammas must be >= 0, got gamma_pos={gamma_pos}, gamma_neg={gamma_neg}")
        if not 0.0 <= clip < 1.0:
            raise ValueError(f"clip must be in [0, 1), got {clip}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.bce_weight = bce_weight
        self.asl_weight = asl_weight
        self.label_smoothing = label_smoothing
        self.gamma_pos = gamma_pos
        self.gamma_neg = gamma_neg
        self.clip = clip
        self.eps = eps

    def parts(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weighted parts {'bce': ..., 'asl': ...} (scalars), for logging."""
        _check(logits, targets)
        # Autocast off: keep the logs and sigmoids in float32 even inside bf16/fp16 regions.
        with torch.autocast(device_type=logits.device.type, enabled=False):
            bce = smoothed_bce_loss(logits, targets, self.label_smoothing)
            asl = asymmetric_loss(logits, targets, self.gamma_pos, self.gamma_neg, self.clip, self.eps)
        return {"bce": self.bce_weight * bce, "asl": self.asl_weight * asl}

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        parts = self.parts(logits, targets)
        return parts["bce"] + parts["asl"]

    def extra_repr(self) -> str:
        return (
            f"bce_weight={self.bce_weight}, asl_weight={self.asl_weight}, "
            f"label_smoothing={self.label_smoothing}, gamma_pos={self.gamma_pos}, "
            f"gamma_neg={self.gamma_neg}, clip={self.clip}, eps={self.eps}"
        )
