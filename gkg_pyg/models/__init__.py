"""The model families (timm style, one per file) and their shared registry.

* :mod:`.pvig`: Pyramid ViG, the backbone (:class:`PyramidViGBackbone`) and the
  ImageNet classifier (:class:`PyramidViG`);
* :mod:`.gkgnet`: GKGNet, the Pyramid ViG backbone plus the label path;
* their parts: :mod:`gkg_pyg.geometry` (stage grids, input sizes), :mod:`.positions`
  (the relative-position term), :mod:`.layers` (node-feature layers),
  :mod:`.convert` (the authors' checkpoint layouts).

Importing this package registers every model name (:func:`create_model`).
"""

from .registry import create_model, list_models, register_model
from ..geometry import min_input_size
from .pvig import PyramidViG, PyramidViGBackbone
from .gkgnet import GKGNet, pretrained_cfgs
from .convert import export_authors_checkpoint

__all__ = [
    "GKGNet",
    "PyramidViG",
    "PyramidViGBackbone",
    "create_model",
    "list_models",
    "min_input_size",
    "pretrained_cfgs",
    "register_model",
    "export_authors_checkpoint",
]
