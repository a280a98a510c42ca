"""CUDA code on a machine without a GPU: fake CUDA tensors, CUDA autocast, a
backward pass, and an exact account of the memory that tensors hold.

``FakeTensorMode`` gives tensors on ``"cuda"`` that carry shapes, dtypes and
devices but no data, so a model's forward pass runs on any machine, and any
read of a value to the host (``.item()``, ``.tolist()``, ``bool(tensor)``)
raises.  Three gaps are filled here:

* :func:`fake_cuda_autocast`: ``torch.autocast("cuda")`` turns itself off
  (with a warning) when no GPU is visible; this context keeps it on, so that
  the CUDA autocast policy (which operators run in fp16/bf16, which in
  float32) applies to fake CUDA tensors.
* :func:`backward`: PyTorch's autograd engine needs a CUDA context for a
  graph with CUDA tensors (``GraphTask::stash_current_streams`` raises
  ``RuntimeError: hasPrimaryContext expects a valid device index`` without a
  GPU).  This function runs the same backward functions (the graph's nodes,
  custom ``autograd.Function`` backward passes included) from Python, in the
  engine's order (ready nodes by decreasing sequence number, gradient
  accumulation first), releasing each node, and so its saved tensors, once it
  has run, as the engine does.  Tensor hooks and ``retain_grad`` are not
  supported (the models here use neither).
* :class:`MemoryTracker`: a ``TorchDispatchMode`` that accounts every storage
  an operator allocates (rounded up to the CUDA caching allocator's 512-byte
  blocks) until it is freed (a weak reference's callback), with the peak and,
  for the peak, what held the memory: parameters, gradients, optimizer state,
  and the rest by phase and by the module whose forward created it.  On fake
  CUDA tensors its peak estimates ``torch.cuda.max_memory_allocated`` of the
  same step.  The ``gkg_pyg::`` operators are opaque to a dispatch mode (their
  fake implementations allocate only the outputs); the tracker runs their
  PyTorch implementation instead, so that their temporaries are counted as
  they occur on a GPU (except ``gkg_pyg::cluster_knn``, whose search is
  torch-cluster's kernel: its output is counted, not its few temporaries of
  the output's size).
"""

from __future__ import annotations

import contextlib
import heapq
import weakref
from collections import defaultdict
from functools import partial
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["fake_mode", "fake_cuda_autocast", "backward", "MemoryTracker", "mib"]


def mib(nbytes: float) -> float:
    return nbytes / 2**20


def fake_mode(allow_non_fake_inputs: bool = False) -> FakeTensorMode:
    """A ``FakeTensorMode``; enter it together with ``torch.device("cuda")`` to
    build a model's parameters as fake CUDA tensors."""
    return FakeTensorMode(allow_non_fake_inputs=allow_non_fake_inputs)


@contextlib.contextmanager
def fake_cuda_autocast(dtype: Optional[torch.dtype]):
    """``torch.autocast("cuda", dtype)`` that stays on without a GPU (``dtype=None``:
    no autocast).  Only for fake tensors: there is no GPU to run real ones."""
    if dtype is None:
        yield
        return
    import torch.cuda.amp.common as amp_common

    saved = amp_common.amp_definitely_not_available, torch.cuda.is_bf16_supported
    amp_common.amp_definitely_not_available = lambda: False
    torch.cuda.is_bf16_supported = lambda *args, **kwargs: True
    try:
        with torch.autocast("cuda", dtype=dtype):
            yield
    finally:
        amp_common.amp_definitely_not_available, torch.cuda.is_bf16_supported = saved


def _call_node(node, grads: List[Optional[Tensor]]) -> Tuple[Optional[Tensor], ...]:
    if isinstance(node, torch.autograd.function.BackwardCFunction):  # a Python autograd.Function
        if getattr(node, "materialize_grads", True):
            metadata = node._input_metadata
            grads = [
                torch.zeros(m.shape, dtype=m.dtype, device=m.device) if g is None else g
                for g, m in zip(grads, metadata)
            ]
        out = node.apply(*grads)
    else:
        out = node(*grads)
    return out if isinstance(out, tuple) else (out,)


def _validate(grad: Tensor, meta) -> Tensor:
    """What the engine's ``validate_outputs`` does to a gradient before passing it
    on: sum a broadcast gradient down to the input's shape, cast it to the
    input's dtype."""
    shape = torch.Size(meta.shape)
    if grad.shape != shape:
        grad = grad.sum_to_size(shape)
    if grad.dtype != meta.dtype:
        grad = grad.to(meta.dtype)
    return grad


def backward(outputs: List[Tensor], grads: Optional[List[Tensor]] = None) -> None:
    """``torch.autograd.backward(outputs, grads)`` without the engine (see the
    module docstring).  ``outputs`` is emptied: the graph is released as it
    runs only when the caller holds no other reference to the outputs."""
    grads = [torch.ones_like(t) for t in outputs] if grads is None else list(grads)
    roots = [(t.grad_fn, g) for t, g in zip(outputs, grads) if t.grad_fn is not None]
    outputs.clear()
    grads.clear()
    nodes: Dict[int, object] = {}
    pending: Dict[int, int] = defaultdict(int)  # gradients each node still waits for
    stack = [node for node, _ in roots]
    while stack:
        node = stack.pop()
        if id(node) in nodes:
            continue
        nodes[id(node)] = node
        for nxt, _ in node.next_functions:
            if nxt is not None:
                pending[id(nxt)] += 1
                if id(nxt) not in nodes:
                    stack.append(nxt)
    buffers: Dict[int, Dict[int, Tensor]] = defaultdict(dict)
    ready: List[Tuple[int, int]] = []
    for node, g in roots:
        buffers[id(node)][0] = g if 0 not in buffers[id(node)] else buffers[id(node)][0] + g
        if pending[id(node)] == 0 and (-node._sequence_nr(), id(node)) not in ready:
            heapq.heappush(ready, (-node._sequence_nr(), id(node)))
    del roots, stack
    node = g = None
    with torch.no_grad():
        while ready:
            _, key = heapq.heappop(ready)
            node = nodes.pop(key)
            buffer = buffers.pop(key, {})
            count = len(node._input_metadata) if hasattr(node, "_input_metadata") else max(buffer, default=-1) + 1
            inputs = [buffer.get(i) for i in range(count)]
            del buffer
            results = _call_node(node, inputs)
            del inputs
            g = nxt = None
            for (nxt, slot), g in zip(node.next_functions, results):
                if nxt is None:
                    continue
                target = id(nxt)
                if g is not None:
                    g = _validate(g, nxt._input_metadata[slot])
                    held = buffers[target]
                    held[slot] = g if slot not in held else held[slot] + g
                pending[target] -= 1
                if pending[target] == 0:
                    heapq.heappush(ready, (-nxt._sequence_nr(), target))
            del node, results, g, nxt


class MemoryTracker(TorchDispatchMode):
    """Live and peak bytes of every storage allocated while the mode is active
    (see the module docstring).

    Use::

        tracker = MemoryTracker()
        tracker.track_existing(model, optimizer)   # what already lives
        with tracker:
            ...one training step...
        tracker.peak, tracker.breakdown()

    ``phase(name)`` labels what is allocated inside it (``forward``,
    ``backward``, ``optimizer``).  ``snapshot_at``: the allocation count at
    which to keep the breakdown (that of a first run's peak, for a second run).
    """

    def __init__(self, round_to: int = 512, snapshot_at: Optional[int] = None):
        super().__init__()
        self.round_to = round_to
        self.live = 0
        self.peak = 0
        self.peak_at = 0  # the allocation count when the peak was reached
        self.count = 0
        self.snapshot_at = snapshot_at
        self.snapshot: Optional[Dict[str, int]] = None
        self._storages: Dict[int, Tuple[weakref.ref, int, str]] = {}
        self._phase = "setup"
        self._modules: List[str] = []
        self._names: Dict[int, str] = {}  # id(tensor storage) -> category of tracked model state
        self._hooks: list = []
        self._state = None

    # -- accounting ------------------------------------------------------------------------------
    def _size(self, nbytes: int) -> int:
        return -(-nbytes // self.round_to) * self.round_to if nbytes else 0

    def _add(self, t: Tensor, label: Optional[str] = None) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._storages:
            return
        nbytes = self._size(storage.nbytes())
        if label is None:
            label = f"{self._phase}: {self._modules[-1] if self._modules else '(no module)'}"
        self._storages[key] = (weakref.ref(storage, lambda _, key=key: self._free(key)), nbytes, label)
        self.live += nbytes
        self.count += 1
        if self.live > self.peak:
            self.peak, self.peak_at = self.live, self.count
        if self.snapshot_at is not None and self.count == self.snapshot_at:
            self.snapshot = self.breakdown()

    def _free(self, key: int) -> None:
        entry = self._storages.pop(key, None)
        if entry is not None:
            self.live -= entry[1]

    def track_existing(self, *objects) -> None:
        """Count the storages that already live: modules' parameters, gradients
        and buffers, optimizers' state, and plain tensors."""
        for obj in objects:
            if isinstance(obj, nn.Module):
                for p in obj.parameters():
                    self._add(p, "parameters")
                    if p.grad is not None:
                        self._add(p.grad, "gradients")
                for b in obj.buffers():
                    self._add(b, "buffers")
            elif isinstance(obj, torch.optim.Optimizer):
                for state in obj.state.values():
                    for value in state.values():
                        if isinstance(value, Tensor):
                            self._add(value, "optimizer state")
            elif isinstance(obj, Tensor):
                self._add(obj, "inputs")

    def watch_state(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Name the model's parameters, gradients and buffers and the optimizer's
        state as such in :meth:`breakdown`, whenever they were made."""
        self._state = (model, optimizer)

    def _state_labels(self) -> Dict[int, str]:
        labels: Dict[int, str] = {}
        if self._state is None:
            return labels
        model, optimizer = self._state
        for p in model.parameters():
            labels[id(p.untyped_storage())] = "parameters"
            if p.grad is not None:
                labels[id(p.grad.untyped_storage())] = "gradients"
        for b in model.buffers():
            labels[id(b.untyped_storage())] = "buffers"
        if optimizer is not None:
            for state in optimizer.state.values():
                for value in state.values():
                    if isinstance(value, Tensor):
                        labels[id(value.untyped_storage())] = "optimizer state"
        return labels

    def breakdown(self) -> Dict[str, int]:
        """Live bytes by label (model state by kind, the rest by phase and module), largest first."""
        state = self._state_labels()
        out: Dict[str, int] = defaultdict(int)
        for key, (_, nbytes, label) in self._storages.items():
            out[state.get(key, label)] += nbytes
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    @contextlib.contextmanager
    def phase(self, name: str):
        saved, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = saved

    def label(self, t: Tensor, name: str) -> None:
        """Re-label a live tensor's storage (e.g. gradients once the backward pass made them)."""
        entry = self._storages.get(id(t.untyped_storage()))
        if entry is not None:
            self._storages[id(t.untyped_storage())] = (entry[0], entry[1], name)

    def watch_modules(self, model: nn.Module, depth: int = 3) -> None:
        """Label activations by the module (up to ``depth`` name components) whose forward made them."""
        for name, module in model.named_modules():
            if not name or name.count(".") >= depth:
                continue
            self._hooks.append(module.register_forward_pre_hook(partial(self._enter, name)))
            self._hooks.append(module.register_forward_hook(self._leave))

    def _enter(self, name: str, module, args) -> None:  # hooks return None: a value would replace the output
        self._modules.append(name)

    def _leave(self, module, args, output) -> None:
        self._modules.pop()

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    # -- dispatch --------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = _python_impl(func)
        if impl is not None:
            with self:  # the operator's PyTorch path, tracked op by op
                out = impl(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self._add(t)
        return out


# Operators whose implementation calls a foreign kernel without a fake implementation (torch-cluster's
# search): their outputs are counted, not their temporaries (a few of the output's size).
OPAQUE = {"gkg_pyg::cluster_knn"}


def _python_impl(func) -> Optional[Callable]:
    """The Python implementation of a ``gkg_pyg::`` custom operator (``None`` for others)."""
    name = getattr(func, "namespace", None)
    if name != "gkg_pyg" or func._schema.name in OPAQUE:
        return None
    from torch._library.custom_ops import _maybe_get_opdef

    opdef = _maybe_get_opdef(func._schema.name)
    return None if opdef is None else opdef._init_fn


def parameters_and_grads(modules: Iterable[nn.Module]) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
