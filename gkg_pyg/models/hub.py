"""Published weights of the registered models and how ``create_model(..., pretrained=True)`` gets them.

:data:`PRETRAINED` is the one table of published weights: model name -> tag
-> entry; a model's first tag is its default (timm's ``name.tag``). An entry
holds

* ``url``: a direct download, or None where there is none; then ``hint``
  says where to get the file and how to pass it;
* ``filename``: the file's name in the cache;
* ``source``: the checkpoint's layout (``gkg_pyg.models.convert.LAYOUTS``);
* ``loads``: ``"full"`` (every tensor of the model, the classifier reset
  when the label count differs) or ``"backbone"`` (the patch path only: the
  label path and heads of a GKGNet keep their fresh initialisation);
* ``num_classes``: the label count of the classifier loaded with the
  weights (0 for ``"backbone"``, timm's convention); ``origin_url`` (the
  page the file comes from) and ``description``.

``gkgnet_{ti,s,m,b}`` default to the paper's starting point, their patch
path from the matching Pyramid ViG ImageNet-1k weights (tag ``imagenet``);
``gkgnet_s.coco_576`` is the authors' trained GKGNet-S (COCO, 576 x 576,
87.65 mAP), only on Google Drive, so it is loaded from a local file
(``pretrained_cfg_overlay=dict(file=...)``). ``pvig_*`` load their ImageNet
weights completely (the 1000-class layer is replaced when the model has
another class count).

Downloads go to torch's hub cache, ``torch.hub.get_dir()/checkpoints``
(``$TORCH_HOME/hub/checkpoints``), and are reused from there. A download is
written to a temporary file next to its destination and moves into the cache
only when it is complete (as many bytes as the server announced) and loads
as a checkpoint: ``torch.hub.download_url_to_file`` would keep a truncated
file, since it does not compare the bytes it got with the announced length.
A cached file that does not load is removed, so that the next call
downloads it again.
"""

from __future__ import annotations

import difflib
import http.client
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse
from urllib.request import Request, urlopen

import torch
from torch import nn

from ..checkpoint import CheckpointError, convert_checkpoint, format_report, load_checkpoint, torch_load_weights
from ..errors import ConfigError, GkgError, MissingFileError

__all__ = [
    "PRETRAINED",
    "PretrainedWeightsError",
    "cache_path",
    "check_available",
    "download",
    "fetch_pretrained",
    "load_pretrained",
    "load_resetting_classifier",
    "pretrained_tags",
    "resolve_pretrained_cfg",
]

log = logging.getLogger(__name__)

PVIG_RELEASE = "https://github.com/huawei-noah/Efficient-AI-Backbones/releases/download/pyramid-vig/"
PVIG_RELEASE_PAGE = "https://github.com/huawei-noah/Efficient-AI-Backbones/releases/tag/pyramid-vig"
GKGNET_S_COCO_576_PAGE = "https://drive.google.com/file/d/1TB_UqqFvpQ2bvy_qau0aKP6GoK9Xlix_/view?usp=share_link"
# Pyramid ViG ImageNet-1k files of the release and their top-1 accuracy (%).
_PVIG_FILES = {
    "ti": ("pvig_ti_78.5.pth.tar", 78.5),
    "s": ("pvig_s_82.1.pth.tar", 82.1),
    "m": ("pvig_m_83.1.pth.tar", 83.1),
    "b": ("pvig_b_83.66.pth.tar", 83.66),
}
# The keys an entry of PRETRAINED may set (and pretrained_cfg_overlay besides ``file``).
ENTRY_KEYS = ("url", "hint", "filename", "source", "loads", "num_classes", "input_size", "origin_url", "description")
LOADS = ("full", "backbone")
DOWNLOAD_TIMEOUT_S = 60.0  # per connection attempt and per read, not for the whole file
_CHUNK = 1 << 20


class PretrainedWeightsError(GkgError, OSError):
    """Published weights that cannot be had: no direct download, a failed or
    incomplete download, or a downloaded file that does not load (an
    ``OSError``, like urllib's own download errors)."""


def _pvig(variant: str) -> dict:
    filename, top1 = _PVIG_FILES[variant]
    return dict(
        url=PVIG_RELEASE + filename,
        filename=filename,
        source="pyramid_vig",
        loads="full",
        num_classes=1000,
        origin_url=PVIG_RELEASE_PAGE,
        description=f"Pyramid ViG-{variant.capitalize()} on ImageNet-1k (top-1 {top1}%), Han et al.",
    )


def _gkgnet_backbone(variant: str) -> dict:
    entry = _pvig(variant)
    entry.update(
        loads="backbone",
        num_classes=0,  # timm's convention for weights without a classifier: the ImageNet one is not loaded
        description=f"patch path from {entry['description']}; the label path and heads start fresh (the paper's "
        "starting point)",
    )
    return entry


PRETRAINED: Dict[str, Dict[str, dict]] = {}
for _v in _PVIG_FILES:
    PRETRAINED[f"pvig_{_v}"] = {"imagenet": _pvig(_v)}
    PRETRAINED[f"gkgnet_{_v}"] = {"imagenet": _gkgnet_backbone(_v)}
PRETRAINED["gkgnet_s"]["coco_576"] = dict(
    url=None,
    hint=(
        "the authors' GKGNet-S trained on MS-COCO at 576 x 576 (87.65 mAP, mmcls layout) is only on Google Drive, "
        f"with no direct download: download it in a browser from {GKGNET_S_COCO_576_PAGE}, then load it with "
        "create_model('gkgnet_s', pretrained='coco_576', pretrained_cfg_overlay=dict(file='PATH'), img_size=576) "
        "or create_model('gkgnet_s', pretrained='PATH', num_classes=80, img_size=576) "
        "(in a config: model.pretrained: PATH, or model.init_from: PATH for another label set)"
    ),
    filename=None,
    source="gkgnet_mmcls",
    loads="full",
    num_classes=80,
    input_size=(3, 576, 576),
    origin_url=GKGNET_S_COCO_576_PAGE,
    description="GKGNet-S on MS-COCO 2014 at 576 x 576 (87.65 mAP), the authors' checkpoint",
)


def pretrained_tags(arch: str) -> List[str]:
    """The tags of ``arch``'s published weights, the default first ([] if none)."""
    return list(PRETRAINED.get(arch, {}))


def resolve_pretrained_cfg(
    arch: str, tag: Optional[str] = None, base: Optional[Mapping] = None, overlay: Optional[Mapping] = None
) -> dict:
    """``arch``'s pretrained_cfg for ``tag`` (None: the default tag):
    ``base`` (the cfg the model registered: input size, mean/std, ...), then
    the table's entry with ``architecture`` and ``tag``, then ``overlay``
    (``file``: a local checkpoint to load instead of downloading; ``url``:
    another download; or any key of the entry or of ``base``)."""
    tags = pretrained_tags(arch)
    if tag is None:
        tag = tags[0] if tags else None
    elif tag not in tags:
        raise ConfigError(f"{arch} has no pretrained tag {tag!r}; its tags: {tags or 'none'}")
    cfg = dict(base or {})
    # ``file`` is timm's local checkpoint path, set by the overlay only; the table names downloads ``filename``.
    cfg.update(architecture=arch, tag=tag, url=None, file=None)
    if tag is not None:
        cfg.update(PRETRAINED[arch][tag])
    if overlay:
        if not isinstance(overlay, Mapping):
            raise TypeError(f"pretrained_cfg_overlay must be a dict, got {type(overlay).__name__}")
        allowed = set(ENTRY_KEYS) | {"file"} | set(cfg)
        for key in overlay:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"unknown pretrained_cfg_overlay key {key!r}{hint}; known: {sorted(allowed)}")
        for key in ("file", "url"):
            if overlay.get(key) is not None and not isinstance(overlay[key], (str, os.PathLike)):
                raise TypeError(f"pretrained_cfg_overlay {key} must be a path or string, got {overlay[key]!r}")
        cfg.update(overlay)
        if overlay.get("url") is not None and "filename" not in overlay:
            cfg["filename"] = None  # named after the new URL, not the default one
        if overlay.get("file") is not None:
            cfg["file"] = os.fspath(overlay["file"])
    if cfg.get("loads", "full") not in LOADS:
        raise ConfigError(f"pretrained_cfg loads must be one of {LOADS}, got {cfg['loads']!r}")
    return cfg


def cache_path(cfg: Mapping) -> Path:
    """Where ``cfg``'s download lives: ``torch.hub.get_dir()/checkpoints/<filename>``,
    the filename defaulting to the last part of the URL's path."""
    name = cfg.get("filename") or os.path.basename(urlparse(cfg["url"]).path)
    if not name or name in (".", ".."):
        raise ConfigError(f"cannot name a cache file after the URL {cfg['url']!r}: pass pretrained_cfg_overlay "
                          "filename=...")  # fmt: skip
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def _progress_bar(total: Optional[int], name: str, show: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency; torch.hub has the same fallback without it
        from torch.hub import tqdm
    return tqdm(total=total, disable=not show, unit="B", unit_scale=True, unit_divisor=1024, desc=name)


def download(url: str, dst: Union[str, os.PathLike], progress: Optional[bool] = None) -> Path:
    """Download ``url`` to a new temporary file next to ``dst`` and return its
    path (the caller checks it and moves it to ``dst``).

    ``progress``: a progress bar on stderr (None: when stderr is a terminal).
    Raises :class:`PretrainedWeightsError` when the server cannot be reached,
    answers with an error, stops sending, or sends fewer or more bytes than its
    ``Content-Length``; no temporary file is left then.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f"{dst.name}.{uuid.uuid4().hex}.partial")
    show = sys.stderr.isatty() if progress is None else progress
    try:
        request = Request(url, headers={"User-Agent": "gkg-pyg"})
        with urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response, open(tmp, "wb") as out:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.strip().isdigit() else None
            got = 0
            with _progress_bar(expected, dst.name, show) as bar:
                while True:
                    chunk = response.read(_CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
        if expected is not None and got != expected:
            raise PretrainedWeightsError(
                f"the download of {url} is incomplete: {got} of {expected} bytes (the connection ended early)"
            )
        if got == 0:
            raise PretrainedWeightsError(f"the download of {url} is empty (0 bytes)")
        return tmp
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, PretrainedWeightsError):
            raise
        if isinstance(err, HTTPError):
            raise PretrainedWeightsError(f"cannot download {url}: HTTP {err.code} {err.reason}") from None
        if isinstance(err, http.client.IncompleteRead):
            raise PretrainedWeightsError(
                f"the download of {url} is incomplete: {len(err.partial)} more bytes, then the connection ended"
            ) from None
        if isinstance(err, URLError):
            raise PretrainedWeightsError(f"cannot download {url}: {err.reason}") from None
        if isinstance(err, (OSError, http.client.HTTPException)):  # timeouts, resets, bad responses
            raise PretrainedWeightsError(f"cannot download {url}: {type(err).__name__}: {err}") from None
        raise


def _offline_hint(cfg: Mapping, dst: Path) -> str:
    return (
        f"Without network, get the file elsewhere and put it at {dst} (used from then on), or load it from "
        "anywhere with create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file='PATH')) "
        "(in a config: model.pretrained: PATH)"
    )


def _what(cfg: Mapping) -> str:
    tag = f".{cfg['tag']}" if cfg.get("tag") else ""
    return f"{cfg.get('architecture', 'the model')}{tag}"


def check_available(cfg: Mapping) -> None:
    """Raise :class:`PretrainedWeightsError`, saying where to get the file and
    how to pass it, when ``cfg`` names neither a local file nor a URL."""
    if cfg.get("file") is None and not cfg.get("url"):
        hint = cfg.get("hint") or (
            "none is known: pass a checkpoint with pretrained='PATH', pretrained_cfg_overlay=dict(file='PATH') "
            "or pretrained_cfg_overlay=dict(url='URL')"
        )
        raise PretrainedWeightsError(f"no direct download of the pretrained weights of {_what(cfg)}: {hint}")


def fetch_pretrained(cfg: Mapping, progress: Optional[bool] = None, verbose: bool = True) -> Tuple[dict, str]:
    """``(checkpoint, where)``: the weights ``cfg`` names, read (``weights_only``).

    ``cfg["file"]`` (from ``pretrained_cfg_overlay``) is read as it is; else
    ``cfg["url"]`` comes from the cache, or is downloaded into it (a file that
    does not load never gets there, and a cached one that does not load is
    removed); without a URL, ``cfg["hint"]`` says where to get the file.
    """
    if cfg.get("file") is not None:
        path = os.fspath(cfg["file"])
        if not os.path.isfile(path):
            raise MissingFileError(f"pretrained_cfg_overlay file not found: {path}")
        return torch_load_weights(path), path
    check_available(cfg)
    url = cfg["url"]
    dst = cache_path(cfg)
    if dst.is_file():
        try:
            return torch_load_weights(dst), os.fspath(dst)
        except CheckpointError as err:
            dst.unlink(missing_ok=True)
            raise PretrainedWeightsError(
                f"the cached weights of {_what(cfg)} ({url}) do not load, so {dst} was removed (the next call "
                f"downloads it again): {err}"
            ) from None
    if verbose:
        # WARNING, not INFO: shown on stderr (like torch.hub's notice) even where no logging is set up.
        log.warning(f"downloading the pretrained weights of {_what(cfg)}: {url} -> {dst}")
    try:
        tmp = download(url, dst, progress)
    except PretrainedWeightsError as err:
        raise PretrainedWeightsError(
            f"{err}. Nothing was written to the cache ({dst}). {_offline_hint(cfg, dst)}"
        ) from None
    try:
        checkpoint = torch_load_weights(tmp)
        os.replace(tmp, dst)  # atomic: concurrent downloads (one per process) each move a complete file
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, CheckpointError):
            raise PretrainedWeightsError(
                f"the file downloaded from {url} for {_what(cfg)} does not load, so it was not kept in the cache "
                f"({dst}): {str(err).replace(os.fspath(tmp), dst.name + ' (download)')}"
            ) from None
        raise
    return checkpoint, os.fspath(dst)


def load_resetting_classifier(
    model: nn.Module, checkpoint, reset_to: Optional[int], name: str, source: str = "auto"
) -> dict:
    """Load ``checkpoint`` strictly; with ``reset_to`` (the checkpoint's label
    count), the model's classifier is first reset to that count so that the
    checkpoint's classifier fits, then, whatever happens, reset to the model's
    own labels (freshly initialised).

    Returns :func:`gkg_pyg.load_checkpoint`'s report, its ``used``, ``skipped``
    and ``missing`` corrected for the reset classifier, plus ``"dropped_head"``:
    the model keys whose checkpoint tensors were left out.
    """
    ours, names = model.num_classes, model.class_names
    dropped, filtered = [], None
    if reset_to is not None:
        filtered = convert_checkpoint(model, checkpoint, source)
        before = model.state_dict()  # holds the old tensors, so their memory cannot be reused below
        model.reset_classifier(reset_to)
        # The parts reset_classifier renewed are the classifier, whatever the model family.
        dropped = [k for k, v in model.state_dict().items() if k not in before or before[k].data_ptr() != v.data_ptr()]
    try:
        report = load_checkpoint(model, checkpoint, source=source, verbose=False, name=name)
    finally:  # the model's own labels again, also when the checkpoint did not fit
        if reset_to is not None:
            model.reset_classifier(ours, names)
    if dropped:
        report["used"] = [filtered["names"][k] for k in filtered["state_dict"] if k not in dropped]
        report["skipped"] = report["skipped"] + [filtered["names"][k] for k in dropped if k in filtered["names"]]
        report["missing"] = dropped
    report["dropped_head"] = dropped
    return report


def load_pretrained(model: nn.Module, cfg: Mapping, progress: Optional[bool] = None, verbose: bool = True) -> dict:
    """Load the published weights ``cfg`` names into ``model`` (timm's
    ``pretrained=True``): :func:`fetch_pretrained`, then strict loading with
    the safe loader, where a classifier of another label count is left out
    and the model's stays freshly initialised (a Pyramid ViG checkpoint has
    no label path or heads for a GKGNet: those stay as initialised).

    Returns the loading report (see :func:`load_resetting_classifier`);
    ``verbose`` logs it (INFO, logger ``gkg_pyg.models.hub``, which the
    scripts print) and announces a download (WARNING, so that it reaches
    stderr without any logging set up, as ``torch.hub``'s notice does).
    """
    checkpoint, where = fetch_pretrained(cfg, progress, verbose)
    try:
        theirs = convert_checkpoint(model, checkpoint)["num_classes"]
    except CheckpointError as err:  # e.g. a layout the model does not know: the message names no file
        raise CheckpointError(f"{where}: {err}") from None
    reset_to = theirs if theirs is not None and theirs != model.num_classes else None
    report = load_resetting_classifier(model, checkpoint, reset_to, name=where)
    if verbose:
        lines = [f"pretrained {_what(cfg)} ({where}):", format_report(report)]
        if report["dropped_head"]:
            lines.append(
                f"  new classifier ({theirs} -> {model.num_classes} classes): {', '.join(report['dropped_head'])}"
            )
        log.info("\n".join(lines))
    return report
