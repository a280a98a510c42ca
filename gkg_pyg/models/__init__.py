from .gkgnet import GKGNet, create_model, list_models, min_input_size, pretrained_cfgs

__all__ = ["GKGNet", "create_model", "list_models", "min_input_size", "pretrained_cfgs"]
