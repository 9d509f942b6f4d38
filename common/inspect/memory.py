"""Measure what autograd keeps for backward: the bytes of every saved tensor's storage, each storage once.

    with SavedTensors() as saved:
        loss = model(x).sum()
    saved.bytes, saved.largest   # then loss.backward() as usual

Uses torch.autograd.graph.saved_tensors_hooks, so it sees exactly what the graph holds (also what
custom autograd Functions pass to save_for_backward), on any device. Two saved views of one
storage count once; parameters count too (they are saved by the ops that use them).
"""

from __future__ import annotations

import torch


class SavedTensors(torch.autograd.graph.saved_tensors_hooks):
    def __init__(self):
        self.storages: dict[tuple, int] = {}
        self.largest = 0  # the most elements of one saved tensor

        def pack(t: torch.Tensor):
            storage = t.untyped_storage()
            self.storages[(t.device, storage.data_ptr())] = storage.nbytes()
            self.largest = max(self.largest, t.numel())
            return t

        super().__init__(pack, lambda t: t)

    def __enter__(self) -> "SavedTensors":
        super().__enter__()
        return self

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())
