"""gkg-pyg: GKGNet (Group K-nearest-neighbour Graph Convolutional Network,
ECCV 2024) for multi-label image recognition, in PyTorch Geometric."""

import warnings

with warnings.catch_warnings():
    # torch-scatter and torch-cluster, imported here and by PyG, still use torch.jit.script, which
    # torch deprecates with a FutureWarning per import: noise that no user of gkg-pyg can act on.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    from .knn import batched_group_knn, group_knn
    from .conv import DynamicGroupMaxRelConv, GroupMaxRelConv
    from .graph import build_stage_graph, stack_group_edges
    from .models import GKGNet, PyramidViG, create_model, export_authors_checkpoint, list_models, min_input_size
    from .checkpoint import load_checkpoint

__version__ = "0.1.0"
__all__ = [
    "group_knn",
    "batched_group_knn",
    "GroupMaxRelConv",
    "DynamicGroupMaxRelConv",
    "build_stage_graph",
    "stack_group_edges",
    "GKGNet",
    "PyramidViG",
    "create_model",
    "list_models",
    "min_input_size",
    "load_checkpoint",
    "export_authors_checkpoint",
]
