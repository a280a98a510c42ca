from .registry import create_model, list_models, register_model
from .gkgnet import GKGNet, min_input_size, pretrained_cfgs

__all__ = ["GKGNet", "create_model", "list_models", "min_input_size", "pretrained_cfgs", "register_model"]
