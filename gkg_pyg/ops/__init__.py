"""The operator layer of gkg-pyg's fast paths: PyTorch operators in the
``gkg_pyg`` namespace (``torch.library.custom_op``) over compiled CPU kernels.

=========================================  ==========================================================
``torch.ops.gkg_pyg.smallest_k``           row-wise top-k indices (:func:`smallest_k`)
``torch.ops.gkg_pyg.knn_smallest_k``       the dense kNN in one pass (:func:`knn_smallest_k`)
``torch.ops.gkg_pyg.max_relative``         neighbour maximum + interleave, with autograd (:func:`max_relative`)
``torch.ops.gkg_pyg.max_relative_backward``  its winner scatter, itself differentiable
``torch.ops.gkg_pyg.bn_gelu_linear``       ``[linear](GELU(BatchNorm(h)))``, with autograd (:func:`bn_gelu_linear`)
``torch.ops.gkg_pyg.bn_gelu_linear_backward``  its backward pass (higher derivatives: the plain modules')
``torch.ops.gkg_pyg.onednn_linear``        a large float32 CPU linear map as one oneDNN call (compiled code; grouped)
``torch.ops.gkg_pyg.batch_norm``           ATen's training BatchNorm as one call in compiled code (``gkg_pyg.ops.norm``)
``torch.ops.gkg_pyg.cluster_knn``          torch-cluster's kNN as a fixed-size table (``gkg_pyg.ops.cluster``)
=========================================  ==========================================================

Each operator's real implementation runs the compiled kernel where it
applies (float32 CPU tensors, sizes where the kernel pays) and the PyTorch
path otherwise, inside the operator: a call always returns its result.  The
fake implementations give shapes, dtypes and devices for any device, so
``torch.compile`` keeps each operator as one opaque call whose real kernel
runs, ``torch.export`` records it, and the profiler and dispatch modes see it
by name (FLOP counters count the products of the kNN and of
``bn_gelu_linear``).  :func:`grouped_linear`, :func:`linear_weight_grad` and
:func:`linear_input_grad` are ATen calls that route large float32 CPU maps
and their gradients to oneDNN where it measured faster (a grouped map with
gradients through ``gkg_pyg::onednn_linear``, whose backward pass runs MKL's
products);
:func:`plain_decompositions` turns the operators of an exported program back
into ATen operations for exporters that know only those (ONNX).

The kernels (``csrc/kernels.c``) are compiled on first use with the system C
compiler; without one, or with ``GKG_PYG_NATIVE=0``, every operator runs its
PyTorch path (one warning).  This package imports nothing from gkg_pyg
outside itself.
"""

from ._native import native_available
from .fused import bn_gelu_linear
from .knn import knn_smallest_k, smallest_k
from .linear import grouped_linear, linear_input_grad, linear_weight_grad
from .aggregate import max_relative
from .decompositions import plain_decompositions

__all__ = [
    "smallest_k",
    "knn_smallest_k",
    "max_relative",
    "bn_gelu_linear",
    "grouped_linear",
    "linear_weight_grad",
    "linear_input_grad",
    "native_available",
    "plain_decompositions",
]
