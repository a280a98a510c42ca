from .registry import create_model, list_models, register_model
from .gkgnet import GKGNet, min_input_size, pretrained_cfgs
from .pvig import PyramidViG

__all__ = ["GKGNet", "PyramidViG", "create_model", "list_models", "min_input_size", "pretrained_cfgs", "register_model"]
