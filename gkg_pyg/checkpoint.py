"""Read checkpoint files safely and load them into a model, generically.

``read_checkpoint`` loads tensors and plain containers only
(``torch.load(..., weights_only=True)``): unpickling arbitrary objects could
run code the file carries, so a file that needs more is refused with an error
that says why and how to convert it. Empty, truncated and foreign files get an
error naming the file.

``load_checkpoint`` turns the checkpoint into the model's own names with the
model's ``filter_checkpoint`` (the key maps of foreign layouts live next to
the model, e.g. ``gkg_pyg.models.gkgnet.checkpoint_filter_fn``), checks every
shape before anything is loaded, and loads strictly by default: a missing or
unexpected tensor is an error that lists them. ``strict=False`` loads what
fits and reports the rest. With ``verbose`` the report (what was used,
skipped, missing, resized) goes to the ``gkg_pyg.checkpoint`` logger at INFO
level, which the scripts print.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from typing import Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .errors import CheckpointError, MissingFileError

__all__ = ["read_checkpoint", "torch_load_weights", "convert_checkpoint", "load_checkpoint", "format_report",
           "CheckpointError"]  # fmt: skip

PathOrState = Union[str, os.PathLike, Mapping]
log = logging.getLogger(__name__)


def _numpy_scalar_globals() -> list:
    """What a pickled NumPy scalar needs (mmcv keeps some in a checkpoint's ``meta``,
    e.g. the evaluation hook's ``best_score``): its reconstructor and dtypes, which
    build a number from bytes and run no code of the file's."""
    try:
        import numpy as np
    except ImportError:
        return []
    core = getattr(np, "_core", None) or np.core
    kinds = (np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_)
    return [core.multiarray.scalar, np.dtype] + [type(np.dtype(kind)) for kind in kinds]


def torch_load_weights(path: Union[str, os.PathLike]) -> dict:
    """``torch.load(path, weights_only=True)`` on the CPU, with errors that name
    the file and say what is wrong with it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"checkpoint not found: {path}")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is empty (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK\x03\x04"):  # torch's zip format, whose directory sits at the end
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"cannot read checkpoint {path} ({size} bytes): the file is truncated "
                                  "(torch's zip archive has no central directory)")  # fmt: skip
    elif not head.startswith(b"\x80"):  # nor a legacy pickle
        raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch checkpoint (it starts with {head!r}, "
                              "neither torch's zip format nor a pickle)")  # fmt: skip
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise CheckpointError(
                f"refusing to load {path}: it holds Python objects other than tensors and plain containers, and "
                "unpickling them could run code the file carries, so gkg-pyg loads weights only "
                "(torch.load(..., weights_only=True)). If you trust the file, convert it once: "
                "torch.save(torch.load(PATH, weights_only=False)['state_dict'], 'weights.pth') "
                f"(torch says: {str(err).splitlines()[0]})"
            ) from None
        raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch checkpoint ({err})") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path} ({size} bytes): the file is truncated or not a PyTorch checkpoint "
            f"({reason})"
        ) from None


def _unwrapped_key(key: str) -> str:
    """``key`` without the prefixes of wrapped models' state dicts: DDP's ``module.``,
    ``torch.compile``'s ``_orig_mod.``."""
    while key.startswith(("module.", "_orig_mod.")):
        key = key.split(".", 1)[1]
    return key


def read_checkpoint(path_or_state_dict: PathOrState) -> Tuple[Mapping[str, Tensor], dict]:
    """``(state_dict, whole checkpoint)`` of a path or dict: the state dict is
    unwrapped from ``state_dict`` or ``model`` and loses the ``module.`` (DDP) and
    ``_orig_mod.`` (``torch.compile``) prefixes of wrapped models."""
    where = "the checkpoint"
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        where = os.fspath(path_or_state_dict)
        ckpt = torch_load_weights(where)
    else:
        ckpt = path_or_state_dict
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{where} is not a checkpoint: expected a dict of tensors, got {type(ckpt).__name__}")
    outer = ckpt
    for wrapper in ("state_dict", "model"):
        if isinstance(ckpt.get(wrapper), Mapping):
            ckpt = ckpt[wrapper]
            break
    state = {_unwrapped_key(k): v for k, v in ckpt.items() if isinstance(v, Tensor)}
    if not state:
        raise CheckpointError(f"{where} holds no tensors (keys: {list(ckpt)[:8]})")
    return state, outer


def convert_checkpoint(model: nn.Module, path_or_state_dict: PathOrState, source: str = "auto") -> dict:
    """The checkpoint's tensors in the model's names: the model's
    ``filter_checkpoint(state_dict, source)`` when it has one (foreign
    layouts), else the state dict as it is (``source`` must then be "auto")."""
    state, _ = read_checkpoint(path_or_state_dict)
    if hasattr(model, "filter_checkpoint"):
        return model.filter_checkpoint(state, source)
    if source != "auto":
        raise CheckpointError(f"unknown checkpoint source {source!r}: {type(model).__name__} reads its own layout only")
    return dict(source="state_dict", state_dict=dict(state), names={k: k for k in state}, skipped=[], absent=[],
                resized=[], num_classes=None)  # fmt: skip


def load_checkpoint(
    model: nn.Module, path_or_state_dict: PathOrState, source: str = "auto", strict: bool = True,
    verbose: bool = True, name: Optional[str] = None,
) -> dict:  # fmt: skip
    """Load weights of any layout the model knows into ``model``.

    Args:
        model: e.g. a GKGNet.
        path_or_state_dict: a file (read with ``weights_only=True``) or a dict.
        source: the layout (``"auto"``: detected from the keys).
        strict: every model tensor must be loaded and every checkpoint tensor
            used, except what the layout cannot hold (a Pyramid ViG ImageNet
            checkpoint has no label path and no heads) or deliberately leaves
            out (stored position tables, the ImageNet head). False: load what
            fits and report the rest.
        name: how errors name the checkpoint (default: its path, or "the
            checkpoint" for a dict; pass the file a dict was read from).
        verbose: log the report (INFO, logger ``gkg_pyg.checkpoint``).
    Returns:
        ``{"source", "used", "skipped", "unexpected", "missing", "resized"}``:
        checkpoint keys used, deliberately skipped, unknown; model keys not
        loaded; keys resized.
    Raises:
        CheckpointError (a ValueError): a tensor of the wrong shape (naming
            the key and both shapes), or under ``strict`` missing or unexpected
            tensors (listing them); raised before anything is loaded.
    """
    if name is None:
        is_path = isinstance(path_or_state_dict, (str, os.PathLike))
        name = os.fspath(path_or_state_dict) if is_path else "the checkpoint"
    state, _ = read_checkpoint(path_or_state_dict)
    try:
        filtered = convert_checkpoint(model, state, source)
    except CheckpointError as error:  # a layout problem: say which file
        if name in str(error):
            raise
        raise CheckpointError(f"{name}: {error}") from None
    own = model.state_dict()
    converted, names = filtered["state_dict"], filtered["names"]
    for ours, tensor in converted.items():
        if ours in own and tuple(tensor.shape) != tuple(own[ours].shape):
            theirs = names[ours]
            raise CheckpointError(
                f"checkpoint does not fit the model: {theirs!r} has shape {tuple(state[theirs].shape)} "
                f"but the model's {ours!r} has shape {tuple(own[ours].shape)} ({name})"
            )
    loaded = {k: v for k, v in converted.items() if k in own}
    used = [names[k] for k in loaded]
    known = set(used) | set(filtered["skipped"])
    unexpected = [k for k in state if k not in known]
    missing = [k for k in own if k not in loaded]
    absent = set(filtered["absent"])
    if strict and (unexpected or any(k not in absent for k in missing)):
        wrong = [k for k in missing if k not in absent]
        raise CheckpointError(
            f"{name} does not match the model ({filtered['source']} layout): "
            f"{len(wrong)} model tensors missing from it{': ' + _by_module(wrong) if wrong else ''}; "
            f"{len(unexpected)} unexpected tensors in it{': ' + _by_module(unexpected) if unexpected else ''}. "
            "Load it partially with strict=False only if that is what you mean (e.g. a backbone)."
        )
    model.load_state_dict(loaded, strict=False)
    report = dict(source=filtered["source"], used=used, skipped=list(filtered["skipped"]), unexpected=unexpected,
                  missing=missing, resized=list(filtered["resized"]))  # fmt: skip
    if verbose:
        log.info(format_report(report))
    return report


def _by_module(keys) -> str:
    """All keys, those of one top-level module summarised: ``head_patch.* (2)``."""
    groups: dict = {}
    for key in keys:
        groups.setdefault(key.split(".")[0], []).append(key)
    return ", ".join(
        members[0] if len(members) == 1 else f"{top}.* ({len(members)})" for top, members in groups.items()
    )


def _few(keys, show: int = 6) -> str:
    return ", ".join(keys[:show]) + (f", ... (+{len(keys) - show})" if len(keys) > show else "")


def format_report(report: dict, show: int = 6) -> str:
    lines = [f"loaded {len(report['used'])} tensors ({report['source']} layout)"]
    if report["resized"]:
        lines.append(f"  resized: {_few(report['resized'], show)}")
    if report["skipped"]:
        lines.append(f"  skipped {len(report['skipped'])} checkpoint keys: {_few(report['skipped'], show)}")
    if report.get("unexpected"):
        lines.append(f"  unexpected {len(report['unexpected'])} checkpoint keys (not loaded): "
                     f"{_few(report['unexpected'], show)}")  # fmt: skip
    if report["missing"]:
        lines.append(f"  missing {len(report['missing'])} model keys (left as initialised): "
                     f"{_few(report['missing'], show)}")  # fmt: skip
    return "\n".join(lines)
