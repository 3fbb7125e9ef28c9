"""Which shapes of a traced graph equal which: measured by running it at two batch sizes.

A cut that reads the shape of a value computed before it (``x.shape[0]``) may take that shape
from a cut input instead, when the two are equal. ``Evidence`` runs the model's graph on the
example inputs and on the same inputs at twice the batch size, and records every tensor's shape:
a dimension counts as equal when it is equal in both runs (the batch dimension, which changes
between them, then provably follows the same batch). The run changes nothing: buffers and the
RNG state are restored afterwards.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

__all__ = ["Evidence"]


class Evidence:
    """Tensor shapes of every node (by node name) in two runs of one graph."""

    def __init__(self, root: nn.Module, graph: fx.Graph, example: Any) -> None:
        self._model = (root, graph, example)
        self._runs: list[dict[str, tuple[int, ...]]] | None = None  # measured on first use: most cuts read no shape

    @staticmethod
    def _measure(root: nn.Module, graph: fx.Graph, example: Any) -> list[dict[str, tuple[int, ...]]]:
        args = example if isinstance(example, tuple) else (example,)
        copy = fx.Graph()
        copy.output(copy.graph_copy(graph, {}))  # same node names; the traced graph itself stays unowned
        module = fx.GraphModule(root, copy)
        buffers = {name: b.detach().clone() for name, b in root.named_buffers()}
        rng = torch.random.get_rng_state()
        try:
            twice = tuple(torch.cat([a, a]) if isinstance(a, torch.Tensor) and a.dim() > 0 else a for a in args)
            runs = [_shapes(module, inputs) for inputs in (args, twice)]
        finally:
            torch.random.set_rng_state(rng)
            with torch.no_grad():
                for name, b in root.named_buffers():
                    if name in buffers:
                        b.copy_(buffers[name])
        return runs

    def same(self, source: fx.Node, value: fx.Node, what: str, dim: int | None) -> bool:
        """Whether ``value``'s shape answers the read ``what`` ("size" at ``dim``, "shape", "dim") of ``source``."""
        if self._runs is None:
            self._runs = self._measure(*self._model)
        for run in self._runs:
            have, want = run.get(value.name), run.get(source.name)
            if have is None or want is None:
                return False
            if what == "dim" and len(have) != len(want):
                return False
            if what == "shape" and have != want:
                return False
            if what == "size":
                assert dim is not None
                d = dim + len(want) if dim < 0 else dim
                if not 0 <= d < min(len(want), len(have)) or have[d] != want[d]:
                    return False
        return True


class _Recorder(fx.Interpreter):
    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.shapes: dict[str, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            self.shapes[n.name] = tuple(result.shape)
        return result


def _shapes(module: fx.GraphModule, args: tuple[Any, ...]) -> dict[str, tuple[int, ...]]:
    recorder = _Recorder(module)
    with torch.no_grad():
        recorder.run(*args)
    return recorder.shapes
