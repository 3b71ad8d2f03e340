"""Memory measured storage by storage on CPU, where there are no allocator statistics.

    with StorageTracker() as mem:
        loss_fn(x).backward()
    mem.peak                                   # most bytes alive at once inside the block

    tracker = StorageTracker(group="activations")
    tracker.register(model.parameters(), "weights")   # storages that existed before
    with tracker:
        with tracker.phase("optimizer"):
            optimizer.step()
    tracker.peak_groups                        # {"weights": ..., "optimizer": ...} at the peak

A storage counts from the operator call that returns it, under the group active then, until
torch frees it: never the process RSS, and nothing allocated outside torch's operators.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _cpu_storages(tree) -> list[torch.UntypedStorage]:
    # meta (and fake) tensors hold no memory; other devices have their allocator's statistics
    return [t.untyped_storage() for t in tree_leaves(tree)
            if isinstance(t, torch.Tensor) and t.device.type == "cpu"]


class StorageTracker(TorchDispatchMode):
    """While active, the bytes of the CPU tensor storages alive (``live``), per group
    (``groups``), and both at their peak (``peak``, ``peak_groups``).

    A storage is known by its ``StorageImpl`` (``_cdata``): views share it, it stays the same
    when an ``out=`` operator or ``resize_`` reallocates the bytes under it, and no other storage
    gets its address while it is alive. Its data pointer would not do: it moves when the bytes
    are reallocated, freeing the old address for another storage while the first is alive (one
    of them then goes uncounted), and every empty storage's is 0. A storage an operator
    returns counts as a new allocation only if it is not one of the operator's inputs' (a view
    or an in-place result of a storage that existed before tracking began is not), and it
    counts until torch frees it (a weak-reference finaliser; torch keeps one Python object per
    storage for its whole life). Storages that existed before count only when
    :meth:`register`-ed. New storages go to the group ``current``: set by :meth:`phase` for a
    block, or assigned directly (e.g. from module hooks).
    """

    def __init__(self, group: str = "other"):
        super().__init__()
        self.current = group
        self.live = self.peak = 0
        self.groups: dict[str, int] = {}
        self.peak_groups: dict[str, int] = {}
        self._sizes: dict[int, tuple[int, str]] = {}  # _cdata -> (bytes, group)

    def register(self, tensors: Iterable[torch.Tensor], group: str) -> None:
        """Count the storages of ``tensors`` (created before tracking) under ``group``."""
        for st in _cpu_storages(list(tensors)):
            if st._cdata not in self._sizes:
                self._add(st, group)

    def reset_peak(self) -> None:
        """Start a new peak from what is alive now (e.g. after a warm-up step)."""
        self.peak, self.peak_groups = self.live, dict(self.groups)

    @contextlib.contextmanager
    def phase(self, group: str):
        """Attribute the storages created inside the block to ``group``."""
        previous, self.current = self.current, group
        try:
            yield
        finally:
            self.current = previous

    def _add(self, st: torch.UntypedStorage, group: str) -> None:
        key = st._cdata
        self._sizes[key] = (0, group)
        self._resize(key, st.nbytes())
        weakref.finalize(st, self._drop, key)

    def _resize(self, key: int, nbytes: int) -> None:
        old, group = self._sizes[key]
        if nbytes == old:
            return
        self._sizes[key] = (nbytes, group)
        self.groups[group] = self.groups.get(group, 0) + nbytes - old
        self.live += nbytes - old
        if self.live > self.peak:
            self.peak, self.peak_groups = self.live, dict(self.groups)

    def _drop(self, key: int) -> None:
        nbytes, group = self._sizes.pop(key)
        self.groups[group] -= nbytes
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {st._cdata for st in _cpu_storages((args, kwargs))}
        for st in _cpu_storages(out):
            key = st._cdata
            if key in self._sizes:  # a tracked storage, maybe grown by an out= op or resize_
                self._resize(key, st.nbytes())
            elif key not in inputs:
                self._add(st, self.current)
        return out
