"""What one call produces: the tap names that ``fxtap.names(model, example_inputs)`` lists.

Which modules an eagerly running forward calls (a dropout that fused attention skips, an
embedding an encoder-only forward never uses, a branch on ``self.training``) cannot be known
without running it. ``record`` runs the tapped call once, as ``tap`` would run it, with a
``hooks.Recorder`` that every source of names reports to: the hooks (every call of every module,
``blk``, ``blk_1``), the region graphs (every name of every call they serve, ``blk.add_1``), and
the graph of a traced model (all of its names). ``untouched`` keeps the user's model as it was:
its buffers, the RNG state and its attributes. ``ordered`` sorts the names as ``names(model)``
lists them.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from .._errors import MissingCallError
from . import names as _names
from . import regions as _regions
from .hooks import Recorder, module_paths
from .model import ModelPaths, buffer_values_kept, cuda_devices, preserved
from .placement import Placement
from .runner import EagerRunner, Runner

__all__ = ["checked", "ordered", "record", "untouched"]


def record(runner: Runner, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Recorder:
    """Run ``runner``'s call of ``model`` once; the recorder holds every name it produced, in the
    order produced. Region graphs are lenient: a name a call's graph lacks is not produced by it,
    the others are (``checked`` then keeps those that ``tap`` places on the same graph node)."""
    recorder = Recorder(module_paths(model).values(), ModelPaths.of(model).reserved)
    runner.recorder = recorder
    for region in runner.placement.regions:  # this runner's own regions, built for this call
        region.lenient = True
    try:
        if isinstance(runner, EagerRunner):  # also an ExportRunner: the eager call, never an export
            runner._run(model, args, kwargs, stop_early=False)
        else:
            runner.run(model, args, kwargs)
    except MissingCallError:
        pass  # names the call did not produce: what is being found out (the forward ran to its end)
    finally:
        runner.recorder = None
    if runner.graph is not None:  # a graph computes every name placed on it, whatever the call
        for name in runner.placement.fx:
            recorder.add(name)
    return recorder


def checked(recorder: Recorder, model: nn.Module, placement: Placement) -> list[str]:
    """The recorded names that ``tap`` accepts and places where they were recorded: a name of a
    region graph only if ``tap`` takes it from the same local node of that region's graph (a call
    whose arguments trace to another graph than the default call's may name its nodes otherwise)."""
    names = list(recorder.names)
    if not recorder.sources or not placement.eager_root:
        return names
    found = _regions.resolve(model, names, placement.fallbacks[""], hints=placement.analysis.hints)
    placed = {name: (region.path, local) for region in found.regions for name, local in region.wanted.items()}
    unknown = set(found.unknown)

    def kept(name: str) -> bool:
        if name in unknown:
            return False
        if name in placed:  # from that region's graph, or from a hook when a call of it runs eagerly
            return name not in recorder.sources or placed[name] == recorder.sources[name]
        if name in found.hooks:  # a module call: a hook must have seen it
            return name in recorder.hooked
        return name not in recorder.sources

    return [name for name in names if kept(name)]


def ordered(produced: Iterable[str], listed: list[str]) -> list[str]:
    """``produced`` in the order of ``listed`` (``names(model)``); each name it does not list (a
    later call, ``blk_1``, ``blk.add_1``) right after the calls before it of the same name."""
    produced = list(produced)
    found = set(produced)
    out = [name for name in listed if name in found]
    known = set(out)
    for name in produced:
        if name in known:
            continue
        split = _names.split_suffix(name)
        base = split[0] if split is not None else name
        same = [i for i, other in enumerate(out) if other == base or (_names.split_suffix(other) or ("",))[0] == base]
        out.insert(same[-1] + 1 if same else len(out), name)
        known.add(name)
    return out


@contextmanager
def untouched(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[None]:
    """Run the block without gradients and leave ``model`` as it was: its buffers' values (a
    BatchNorm's running statistics in train mode), the RNG state (dropout draws) and the
    attributes its forward may write (``model.preserved``)."""
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    devices = cuda_devices([*tensors, *model.parameters(), *model.buffers()])
    with buffer_values_kept(model), torch.random.fork_rng(devices=devices), torch.no_grad(), preserved(model):
        yield


def offered_example(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The example inputs ``model`` offers by the Hugging Face convention (``dummy_inputs``: a
    dict of tensors), as keyword arguments that its ``forward`` names, on the device of its
    parameters; ``None`` when it offers none. (transformers' ``T5EncoderModel`` offers decoder
    inputs too, which its forward does not take.)"""
    devices = cuda_devices([*model.parameters(), *model.buffers()])
    try:
        with torch.random.fork_rng(devices=devices):  # the property may draw its example
            offered = getattr(model, "dummy_inputs", None)
        parameters = inspect.signature(model.forward).parameters
    except Exception:  # noqa: BLE001 - a property that raises, a forward without a signature: none offered
        return None
    if not isinstance(offered, Mapping) or not all(isinstance(v, torch.Tensor) for v in offered.values()):
        return None
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    example = {k: v for k, v in offered.items() if k in parameters and parameters[k].kind in named}
    if not example or not _ids_fit(model, example.get("input_ids")):
        return None
    device = next((t.device for t in model.parameters()), None)
    return {k: v if device is None else v.to(device) for k, v in example.items()}


def _ids_fit(model: nn.Module, ids: torch.Tensor | None) -> bool:
    """Whether the offered token ids are within the model's vocabulary (transformers' fixed ids
    go up to 7): an embedding lookup out of range on a GPU is a device-side assert, which leaves
    the CUDA context unusable, not an exception to catch."""
    if ids is None or ids.is_floating_point() or ids.numel() == 0:
        return True
    try:
        embedding = model.get_input_embeddings()  # type: ignore[operator]
    except Exception:  # noqa: BLE001 - no such method, or one that raises: no vocabulary known
        return True
    size = getattr(embedding, "num_embeddings", None)
    return not isinstance(size, int) or (int(ids.min()) >= 0 and int(ids.max()) < size)
