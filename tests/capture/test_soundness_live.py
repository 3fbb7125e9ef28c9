"""The model after ``tap()`` is the model that runs (issue #13, item 2).

Each test taps a model, changes the *user's* model the way people do after building a feature
extractor, and checks the next tapped call against the same model run eagerly (values, dtypes),
for a traceable root and for children traced on their own under an eagerly running root.
"""

from __future__ import annotations

import copy
import types
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from support.truth import assert_same, hook_truth, model_fingerprint
from torch import nn
from torch.nn.utils import parametrize

import fxtap
from fxtap._capture.guard import LIMIT, freeze


class Scaled(nn.Module):
    """Traced through: reads a plain attribute, a buffer, its own parameter and ``training``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.weight = nn.Parameter(torch.randn(4, 4))
        self.register_buffer("shift", torch.full((4,), 0.5))
        self.alpha = 1.0
        self.drop = nn.Dropout(0.5)
        # a config object, as Hugging Face modules hold one: read at trace time, baked into the graph
        self.config = SimpleNamespace(scale=1.0, rope=SimpleNamespace(base=0.0), layers=[SimpleNamespace(gain=1.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(self.fc(x), self.weight) * self.alpha * self.config.scale * self.config.layers[0].gain
        y = y + self.shift + self.config.rope.base
        if self.training:
            y = y * 2
        return self.drop(y)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.block = Scaled()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.block(self.stem(x))))


class EagerRoot(Net):
    """Its own forward cannot be traced (a data-dependent branch): children are traced alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        if h.sum() > 1e9:
            h = h * 0
        return self.head(torch.relu(self.block(h)))


class Symmetric(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.triu() + w.triu(1).T


NAMES = ["stem", "block.fc", "block.add", "block", "head"]


def _swap_block(model: nn.Module) -> None:
    new = Scaled()
    new.alpha = -2.0
    model.block = new


def _reassign_buffer(model: nn.Module) -> None:
    model.block.shift = torch.full((4,), -3.0)


def _reassign_parameter(model: nn.Module) -> None:
    model.block.weight = nn.Parameter(torch.ones(4, 4))


def _load_assign(model: nn.Module) -> None:
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)


def _load_in_place(model: nn.Module) -> None:
    model.load_state_dict({k: v + 1 for k, v in model.state_dict().items()})


CHANGES: dict[str, Callable[[nn.Module], Any]] = {
    "double": lambda m: m.double(),
    "bfloat16": lambda m: m.bfloat16(),
    "half": lambda m: m.half(),
    "to_dtype": lambda m: m.to(torch.float64),
    "reassign_buffer": _reassign_buffer,
    "reassign_parameter": _reassign_parameter,
    "load_state_dict_assign": _load_assign,
    "load_state_dict_in_place": _load_in_place,
    "parametrize_leaf": lambda m: parametrize.register_parametrization(m.block.fc, "weight", Symmetric()),
    "parametrize_traced_through": lambda m: parametrize.register_parametrization(m.block, "weight", Symmetric()),
    "swap_leaf": lambda m: setattr(m.block, "fc", nn.Linear(4, 4)),
    "swap_leaf_for_inplace": lambda m: setattr(m, "stem", nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True))),
    "swap_traced_through": _swap_block,
    "eval_one_submodule": lambda m: m.block.eval(),
    "train_one_dropout": lambda m: m.block.drop.train(),
    "plain_attribute": lambda m: setattr(m.block, "alpha", 3.0),
    "plain_attribute_int": lambda m: setattr(m.block, "alpha", 3),
    "instance_forward": lambda m: setattr(m.block, "forward", types.MethodType(lambda self, x: Scaled.forward(self, x) * 2, m.block)),
    "config_attribute": lambda m: setattr(m.block.config, "scale", -2.0),
    "nested_config_attribute": lambda m: setattr(m.block.config.rope, "base", 4.0),
    "config_in_a_list": lambda m: setattr(m.block.config.layers[0], "gain", 0.5),
}
DTYPES = {"double": torch.float64, "bfloat16": torch.bfloat16, "half": torch.float16, "to_dtype": torch.float64}


def _quiet_tap(model: nn.Module, names: list[str], **options: Any) -> fxtap.Tapped:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
        return fxtap.tap(model, names, keep_output=True, **options)


def _check(tapped: fxtap.Tapped, model: nn.Module, x: torch.Tensor, exact: bool = True) -> None:
    twin = copy.deepcopy(model)  # the same model, run eagerly from the same RNG state
    state = torch.get_rng_state()
    out = tapped(x)
    torch.set_rng_state(state)
    truth = hook_truth(twin, x)
    for name in ["stem", "block.fc", "block", "head", "output"]:
        assert_same(out[name], truth[name], exact=exact)
        assert out[name].dtype == truth[name].dtype, name


@pytest.mark.parametrize("root", [Net, EagerRoot], ids=["traced_root", "eager_root"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_change_after_tap_is_seen_on_the_next_call(change: str, root: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = root().train()  # traced in train mode: ``if self.training`` takes its first branch
    model.block.drop.eval()  # deterministic, unless a change turns it on
    tapped = _quiet_tap(model, NAMES)
    x = torch.randn(3, 4)
    _check(tapped, model, x)  # builds the graph(s) before the change
    before = model_fingerprint(model)
    CHANGES[change](model)
    dtype = DTYPES.get(change, torch.float32)
    if change == "instance_forward" and root is EagerRoot:
        # the block now runs eagerly (its class's code is not what runs), where its ops have no names
        with pytest.raises(fxtap.MissingCallError, match="forward of its own"):
            tapped(x)
        tapped = _quiet_tap(model, [n for n in NAMES if n != "block.add"])
    _check(tapped, model, x.to(dtype), exact=dtype == torch.float32)
    if change in ("double", "to_dtype"):
        assert model_fingerprint(model)["modules"] == before["modules"]


def test_a_graph_kept_current_does_not_rebuild_per_call() -> None:
    model = Net().eval()
    tapped = _quiet_tap(model, NAMES)
    x = torch.randn(2, 4)
    tapped(x)
    graph = tapped.graph_module()
    for _ in range(3):
        tapped(x)
    assert tapped.graph_module() is graph
    with torch.no_grad():
        model.block.weight.add_(1.0)  # an in-place update is read by the graph: no rebuild
    tapped(x)
    assert tapped.graph_module() is graph
    model.block.alpha = 0.25  # baked into the trace: rebuilt
    tapped(x)
    assert tapped.graph_module() is not graph


class Args(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, scale: Any = 1, flag: Any = False, cfg: Any = None) -> torch.Tensor:
        y = self.fc(x.float())
        if flag is True:
            y = y + 100
        if cfg is not None:
            y = y * cfg.k
        return y * scale + x * scale


class Cfg:
    def __init__(self, k: float) -> None:
        self.k = k


def _eager_args(model: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    return copy.deepcopy(model)(*args, **kwargs)


def test_cache_key_separates_int_from_float_and_bool_from_float() -> None:
    torch.manual_seed(0)
    model = Args()
    tapped = _quiet_tap(model, ["fc"])
    x = torch.arange(8).reshape(2, 4)
    for kwargs in ({"scale": 2}, {"scale": 2.0}, {"scale": 2}, {"flag": True}, {"flag": 1.0}, {"flag": True}):
        out = tapped(x, **kwargs)["output"]
        expected = _eager_args(model, x, **kwargs)
        assert out.dtype == expected.dtype, kwargs
        assert_same(out, expected)
    assert freeze(2) != freeze(2.0) and freeze(True) != freeze(1.0) and freeze(True) != freeze(1)


def test_mutated_object_argument_is_seen() -> None:
    model = Args()
    tapped = _quiet_tap(model, ["fc"])
    x = torch.randn(2, 4)
    cfg = Cfg(2.0)
    assert_same(tapped(x, cfg=cfg)["output"], _eager_args(model, x, cfg=cfg))
    cfg.k = -5.0
    assert_same(tapped(x, cfg=cfg)["output"], _eager_args(model, x, cfg=cfg))


class GradBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return y * 2 if torch.is_grad_enabled() else y * 3


def test_grad_mode_branch_follows_the_call() -> None:
    model = GradBranch()
    tapped = _quiet_tap(model, ["fc", "mul"] if "mul" in fxtap.names(model) else ["fc"])
    x = torch.randn(2, 4)
    for grad in (True, False, True, False):
        with torch.set_grad_enabled(grad):
            assert_same(tapped(x)["output"], model(x).detach())


class ScaleArg(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
        return self.fc(x) * sigma


def test_graph_cache_is_bounded() -> None:
    model = ScaleArg()
    tapped = _quiet_tap(model, ["fc"])
    x = torch.randn(2, 4)
    for i in range(3 * LIMIT):
        sigma = 1.0 + i / 7
        assert_same(tapped(x, sigma=sigma)["output"], model(x, sigma=sigma).detach())
    assert len(tapped._runners) <= LIMIT


def test_tapping_changes_nothing_on_the_model() -> None:
    model = Net()
    before = model_fingerprint(model)
    tapped = _quiet_tap(model, NAMES)
    tapped(torch.randn(2, 4))
    after = model_fingerprint(model)
    assert after["modules"] == before["modules"] and after["hooks"] == before["hooks"] and after["training"] == before["training"]
    assert model.block.alpha == 1.0 and type(model.block) is Scaled


class Reaches(nn.Module):
    """Calls a grandchild directly: its parent is never called, so never traced through."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[0][0](x) + 1


def test_swapped_grandchild_called_from_above_is_seen() -> None:
    model = Reaches()
    tapped = _quiet_tap(model, ["blocks.0.0", "add"])
    x = torch.randn(2, 4)
    tapped(x)
    model.blocks[0][0] = nn.Linear(4, 4)
    assert_same(tapped(x)["add"], model(x))


class ExportableRoot(nn.Module):
    """A root FX cannot trace (a Python bool of a size) and torch.export can, reading its config."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Scaled().eval()
        self.config = SimpleNamespace(offset=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 0:
            x = x + self.config.offset
        return self.block(x)


@pytest.mark.parametrize("change", ["root_config", "child_config"])
def test_a_config_changed_after_the_export_is_seen_on_the_next_call(change: str) -> None:
    torch.manual_seed(0)
    model, x = ExportableRoot().eval(), torch.randn(3, 4)
    tapped = _quiet_tap(model, ["block.fc", "block.add", "block"])
    tapped(x)
    tapped(x)
    assert tapped.mode == "export", tapped.report()
    if change == "root_config":
        model.config.offset = 2.5
    else:
        model.block.config.rope.base = -1.0
    out = tapped(x)
    with torch.no_grad():
        shifted = x + model.config.offset
        truth = hook_truth(model.block, shifted)
        expected = {"block.fc": truth["fc"], "block": truth["output"], "output": model(x)}
    for name, value in expected.items():
        assert_same(out[name], value)


class DefaultDtypeRoot(nn.Module):
    """Makes tensors without naming a dtype: their dtype is the default one at call time."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 0:  # FX cannot trace this root; torch.export can
            x = x + torch.ones(x.shape[-1])
        return self.fc(x.float()) + torch.full((4,), 0.1)


def test_a_default_dtype_set_after_the_export_is_seen_on_the_next_call() -> None:
    torch.manual_seed(0)
    model, x = DefaultDtypeRoot().eval(), torch.randn(2, 4)
    tapped = _quiet_tap(model, ["fc"])
    tapped(x)
    tapped(x)
    assert tapped.mode == "export", tapped.report()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        out = tapped(x)
        expected = model(x)
    finally:
        torch.set_default_dtype(previous)
    assert out["output"].dtype == expected.dtype == torch.float64
    assert_same(out["output"], expected)
    assert_same(tapped(x)["output"], model(x))  # and back: the float32 graph serves again


def test_the_first_call_reports_mixed_mode_and_the_next_one_the_export() -> None:
    model, x = ExportableRoot().eval(), torch.randn(3, 4)
    tapped = _quiet_tap(model, ["block.fc", "block"])
    tapped(x)  # ran in mixed mode, then exported
    assert tapped.mode == "mixed" and set(tapped.paths.values()) == {"fx"}
    assert "next calls run one torch.export graph" in tapped.report()
    tapped(x)
    assert tapped.mode == "export" and set(tapped.paths.values()) == {"export"}


class Patched(Scaled):
    """A class of its own, so that patching its ``forward`` touches no other test."""


@pytest.mark.parametrize("root", ["traced_root", "eager_root", "exported_root"])
def test_a_class_forward_patched_after_tap_is_seen_on_the_next_call(root: str) -> None:
    torch.manual_seed(0)
    model: nn.Module = {"traced_root": Net, "eager_root": EagerRoot, "exported_root": ExportableRoot}[root]()
    model.block = Patched().eval()
    model.eval()
    x = torch.randn(3, 4)
    tapped = _quiet_tap(model, ["block.fc", "block"])
    tapped(x)
    tapped(x)
    original = Patched.forward
    try:
        Patched.forward = lambda self, x: original(self, x) - 1.0  # type: ignore[method-assign]
        out = tapped(x)
        truth = hook_truth(model, x)
    finally:
        Patched.forward = original  # type: ignore[method-assign]
    assert_same(out["block"], truth["block"])
    assert_same(out["output"], truth["output"])


@pytest.mark.parametrize("root", [Net, EagerRoot], ids=["traced_root", "eager_root"])
def test_an_instance_forward_set_before_tap_is_what_runs(root: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = root().eval()
    model.block.forward = types.MethodType(lambda self, x: Scaled.forward(self, x) * 2, model.block)
    tapped = _quiet_tap(model, ["stem", "block.fc", "block", "head"])
    _check(tapped, model, torch.randn(3, 4))
    if root is EagerRoot:
        assert "forward of its own" in tapped.report()


@pytest.mark.parametrize("when", ["before_tap", "after_tap"])
def test_a_forward_set_on_the_model_object_is_what_runs(when: str) -> None:
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(3, 4)

    def patch() -> None:
        model.forward = types.MethodType(lambda self, x: self.head(self.block(self.stem(x) * 3)), model)  # type: ignore[method-assign]

    if when == "before_tap":
        patch()
    tapped = _quiet_tap(model, ["stem", "block.fc", "block", "head"])
    tapped(x)
    if when == "after_tap":
        patch()
    with pytest.warns(fxtap.FallbackWarning, match="forward of its own") if when == "after_tap" else nullcontext():
        _check(tapped, model, x)  # rebuilt: the model now runs eagerly
    _check(tapped, model, x)  # the export frontend's graph, after its first call
    assert "forward of its own" in tapped.report()


class Optional_(nn.Module):
    """Looks for what may be added later: an adapter submodule, a scale attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if hasattr(self, "adapter"):
            y = y + self.adapter(x)
        return y * getattr(self, "scale", 1.0)


@pytest.mark.parametrize("root", ["traced_root", "eager_root", "exported_root"])
def test_a_submodule_or_attribute_added_after_tap_is_seen_on_the_next_call(root: str) -> None:
    torch.manual_seed(0)
    model: nn.Module = {"traced_root": Net, "eager_root": EagerRoot, "exported_root": ExportableRoot}[root]()
    model.block = Optional_()
    model.eval()
    x = torch.randn(3, 4)
    tapped = _quiet_tap(model, ["block.fc", "block"])
    tapped(x)
    tapped(x)
    for change in (lambda: setattr(model.block, "adapter", nn.Linear(4, 4)), lambda: setattr(model.block, "scale", 3.0)):
        change()
        out = tapped(x)
        truth = hook_truth(model, x)
        assert_same(out["block"], truth["block"])
        assert_same(out["output"], truth["output"])
