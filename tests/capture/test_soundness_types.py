"""Code that tells a traced value's type apart runs eagerly (issue #13, bullet 4).

While torch.fx traces, what an opaque leaf returns, a traced op's value and the model's inputs are
Proxies: ``isinstance(p, tuple)`` is False where the model sees a tuple, ``isinstance(h,
torch.Tensor)`` is False where it sees a tensor, and a graph would hold the branch taken for a
Proxy. fxtap makes the module whose code asked run eagerly instead, and says so; a type check that
torch's own code makes on every argument (a ``SymInt`` check in ``torch.arange(x.shape[0])``) is no
reason to. Truth: the model run eagerly.
"""

from __future__ import annotations

import collections
import collections.abc
import dataclasses
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import fxtap
from support.truth import assert_same, quiet_fallbacks

W = 4
UV = collections.namedtuple("UV", "u v")


@dataclasses.dataclass
class UVData:
    u: torch.Tensor
    v: torch.Tensor


class _Two(nn.Module):
    """Returns two values in the container ``how`` names (or their sum, ``how="tensor"``)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.a = nn.Linear(W, W)
        self.how = how

    def forward(self, x: torch.Tensor) -> Any:
        u, v = self.a(x), x * 2
        return {
            "tuple": lambda: (u, v),
            "list": lambda: [u, v],
            "namedtuple": lambda: UV(u, v),
            "dict": lambda: {"u": u, "v": v},
            "dataclass": lambda: UVData(u, v),
            "tensor": lambda: u + v,
        }[self.how]()


class _TellsApart(nn.Module):
    """Branches on the type of what ``two`` returned (each branch is a different computation)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.two = _Two(how)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.two(x)
        if isinstance(p, torch.Tensor):
            return p.tanh()
        if isinstance(p, UV):
            return p.u + p.v
        if isinstance(p, tuple):
            return p[0] * p[1]
        if isinstance(p, list):
            return p[0] - p[1]
        if dataclasses.is_dataclass(p):
            return p.u / (p.v.abs() + 1)
        return p["u"] - 3 * p["v"]


class _Outer(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.block = _TellsApart(how)
        self.head = nn.Linear(W, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


HOWS = ["tuple", "list", "namedtuple", "dict", "dataclass", "tensor"]


def _tap_warned(model: nn.Module, names: list[str]) -> tuple[fxtap.Tapped, str]:
    """``tap(model, names, keep_output=True)`` and the text of the FallbackWarnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tapped = fxtap.tap(model, names, keep_output=True)
    return tapped, "\n".join(str(w.message) for w in caught if issubclass(w.category, fxtap.FallbackWarning))


@pytest.mark.parametrize("how", HOWS)
def test_caller_of_a_hooked_module_that_checks_its_output_type_runs_eagerly(how: str) -> None:
    torch.manual_seed(0)
    model = _Outer(how).eval()
    model.block.two.register_forward_hook(lambda module, inputs, output: None)  # 'block.two' is opaque
    x = torch.randn(2, W)
    tapped, warned = _tap_warned(model, ["block", "head", "block.two.a"])
    assert "submodule 'block' (_TellsApart): checks the type of the output of 'block.two'" in warned
    out = tapped(x)
    assert_same(out["output"], model(x))
    assert_same(out["block"], model.block(x))
    # a leaf the user declares is a Proxy while tracing too: mode="fx" refuses, naming the check
    with pytest.raises(fxtap.TraceFailedError, match="submodule 'block' .*checks the type of the output of 'block.two'"):
        fxtap.tap(_Outer(how), ["head"], mode="fx", leaf_modules=[_Two])


class _ChecksOpValue(nn.Module):
    """``isinstance`` on a traced op's value, not a leaf's: a tensor when the model runs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(W, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * 2
        if isinstance(h, torch.Tensor):
            h = self.fc(h)
        return h + 1


def test_isinstance_on_a_traced_op_value_runs_the_module_eagerly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_ChecksOpValue(), nn.Tanh()).eval()
    x = torch.randn(2, W)
    with quiet_fallbacks():
        out = fxtap.tap(model, ["0.fc", "1"], keep_output=True)(x)
    assert_same(out["output"], model(x))
    assert_same(out["0.fc"], model[0].fc(x * 2))


class _ChecksAbc(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.two = _Two("tuple")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.two(x)
        return p[0] + p[1] if isinstance(p, collections.abc.Sequence) else p.sum(0)


def test_abstract_class_check_on_an_opaque_output_runs_eagerly() -> None:
    torch.manual_seed(0)
    model = _ChecksAbc().eval()
    model.two.register_forward_pre_hook(lambda module, inputs: None)
    x = torch.randn(2, W)
    tapped, warned = _tap_warned(model, ["two.a"])
    assert "_ChecksAbc itself: checks the type of the output of 'two'" in warned
    assert_same(tapped(x)["output"], model(x))


class _RootChecksInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(W, W)

    def forward(self, x: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):  # a tensor when the model runs, a Proxy while tracing
            x = torch.stack(list(x))
        return self.fc(x)


def test_root_that_checks_its_input_type_runs_eagerly() -> None:
    torch.manual_seed(0)
    model = _RootChecksInput().eval()
    x = torch.randn(2, W)
    tapped, warned = _tap_warned(model, ["fc"])
    assert "checks the type of the input 'x'" in warned
    assert_same(tapped(x)["output"], model(x))


class _TorchChecksArguments(nn.Module):
    """Calls torch functions whose C argument parser checks each argument's type: no type check
    of the model's own, so the module stays in the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(W, W)
        self.scale = 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = torch.arange(x.shape[0]) % 2
        h = self.fc(x).index_select(0, idx)
        if isinstance(self.scale, float):  # not a traced value
            h = h * self.scale
        return torch.cat([h, x], dim=1).view(x.shape[0], 2, W).sum(1)


def test_torch_argument_checks_and_checks_of_plain_values_keep_the_graph() -> None:
    torch.manual_seed(0)
    model = _TorchChecksArguments().eval()
    x = torch.randn(3, W)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxtap.FallbackWarning)
        tapped = fxtap.tap(model, ["fc", "cat"], keep_output=True)
    assert tapped.mode == "fx"
    out = tapped(x)
    assert_same(out["output"], model(x))


# -- checks a Proxy answers as the value does (proxy_types.py) ------------------------------------
class _ContainerCheck(nn.Module):
    """``isinstance(value, classes)`` on the value ``made`` produces, as timm's CoaT head does
    (``if isinstance(x_feat, list):``): each branch gives a different result."""

    def __init__(self, made: str, classes: str) -> None:
        super().__init__()
        self.made, self.classes = made, classes
        self.norm = nn.LayerNorm(W)
        self.lstm = nn.LSTM(W, W, batch_first=True)
        self.lying = _Lying()
        self.identity = nn.Identity()

    def forward(self, x: torch.Tensor) -> Any:
        if self.made == "functional":
            h: Any = torch.nn.functional.layer_norm(x, (W,))
        elif self.made == "torch_op":
            h = torch.relu(x)
        elif self.made == "method":
            h = torch.relu(x).transpose(0, 1)
        elif self.made == "nn_module":
            h = self.norm(x)
        elif self.made == "lstm":  # a tuple when the model runs
            h = self.lstm(x)
        elif self.made == "split":  # a tuple when the model runs
            h = torch.split(x, 1, dim=-1)
        elif self.made == "lying":  # a user's module annotated "-> Tensor" that returns a list
            h = self.lying(x)
        elif self.made == "nonzero":  # a tuple with as_tuple=True, though aten::nonzero returns a Tensor
            h = torch.nonzero(x, as_tuple=True)
        elif self.made == "identity":  # nn.Identity is annotated "-> Tensor" and returns its input
            h = self.identity([x])
        else:  # "size": an int when the model runs
            h = x.size(0)
        classes = {"list": list, "tuple": tuple, "list_tuple": (list, tuple), "int": int, "tensor": torch.Tensor}[self.classes]
        if self.classes == "list_tuple":
            hit = isinstance(h, (list, tuple))
        elif self.classes == "tensor":
            hit = isinstance(h, torch.Tensor)
        else:
            hit = isinstance(h, classes)
        return x * 3 if hit else x - 1


class _Lying(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return [x]  # type: ignore[return-value]


MADE = ["functional", "torch_op", "method", "nn_module", "lstm", "split", "lying", "identity", "nonzero", "size"]
CLASSES = ["list", "tuple", "list_tuple", "int", "tensor"]
TENSORS = {"functional", "torch_op", "method", "nn_module"}  # what certainly makes a tensor
NEVER_TENSORS = {"list", "tuple", "list_tuple", "int"}  # classes no tensor is an instance of


@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize("made", MADE)
def test_a_type_check_keeps_the_graph_only_where_proxy_and_value_answer_alike(made: str, classes: str) -> None:
    """Every producer x every class: the value always equals eager; the graph is kept exactly
    where the value is certainly a tensor and the classes are ones no tensor is an instance of."""
    torch.manual_seed(0)
    model, x = nn.Sequential(_ContainerCheck(made, classes), nn.Identity()).eval(), torch.randn(2, 3, W)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # _Lying as a leaf: its output is a Proxy, whose "-> Tensor" annotation is not trusted
        tapped = fxtap.tap(model, ["1"], leaf_modules=[_Lying] if made == "lying" else None)
    warned = "\n".join(str(w.message) for w in caught if issubclass(w.category, fxtap.FallbackWarning))
    assert_same(tapped(x)["1"], model(x))
    if made in TENSORS and classes in NEVER_TENSORS:
        assert warned == "" and tapped.mode == "fx"
    else:
        assert "submodule '0' (_ContainerCheck): checks the type of" in warned


# -- adversarial review of proxy_types.py: checks whose answer the rule got wrong ------------------
class _AnswersByFunction(nn.Module):
    """``hit(self, h)`` decides the branch; ``h`` is ``self.norm``'s output (a tensor when the
    model runs) or ``torch.relu``'s."""

    def __init__(self, hit: Any, by_module: bool = False) -> None:
        super().__init__()
        self.hit, self.by_module = hit, by_module
        self.norm = nn.LayerNorm(W)
        self.cls: Any = torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x) if self.by_module else torch.relu(x)
        return x * 3 if self.hit(self, h) else x - 1


def _conditional_class(self: Any, h: Any) -> bool:
    strict = self.cls is torch.Tensor
    return isinstance(h, torch.Tensor if strict else list)  # the last load before the call: ``list``


def _or_class(self: Any, h: Any) -> bool:
    return isinstance(h, self.cls or list)  # ``self.cls`` is torch.Tensor: ``list`` is never asked


def _tuple_with_conditional(self: Any, h: Any) -> bool:
    return isinstance(h, (self.cls and torch.Tensor or list, tuple))


def _eval_with_local_list(self: Any, h: Any) -> bool:
    return bool(eval("isinstance(h, list)", globals(), {"h": h, "list": self.cls}))  # LOAD_NAME: the local first


def _checks_list(self: Any, h: Any) -> bool:
    return isinstance(h, list)


def _assert_like_eager(model: nn.Module) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(model, nn.Identity()).eval()
    x = torch.randn(2, 3, W)
    with quiet_fallbacks():
        tapped = fxtap.tap(model, ["1"])
    assert_same(tapped(x)["1"], model(x))


@pytest.mark.parametrize("hit", [_conditional_class, _or_class, _tuple_with_conditional, _eval_with_local_list])
def test_classes_chosen_at_run_time_are_not_read_as_the_last_load(hit: Any) -> None:
    _assert_like_eager(_AnswersByFunction(hit))


def _hook_returns_list(module: nn.Module) -> None:
    module.register_forward_hook(lambda m, inputs, output: [output])


def _forward_returns_list(module: nn.Module) -> None:
    module.forward = lambda x: [x]  # type: ignore[method-assign]


@pytest.mark.parametrize("change", [_hook_returns_list, _forward_returns_list])
def test_a_torch_nn_module_whose_instance_returns_a_list_is_no_certain_tensor(change: Any) -> None:
    model = _AnswersByFunction(_checks_list, by_module=True)
    change(model.norm)
    _assert_like_eager(model)


@pytest.mark.parametrize("change", [_hook_returns_list, _forward_returns_list])
def test_a_torch_nn_module_changed_after_tap_to_return_a_list(change: Any) -> None:
    """The graph relied on ``norm`` returning a tensor: a hook (or forward) added later must
    make the graph stale, as one on a traced-through module does."""
    torch.manual_seed(0)
    inner = _AnswersByFunction(_checks_list, by_module=True)
    model, x = nn.Sequential(inner, nn.Identity()).eval(), torch.randn(2, 3, W)
    with quiet_fallbacks():
        tapped = fxtap.tap(model, ["1"])
        tapped(x)
        change(inner.norm)
        assert_same(tapped(x)["1"], model(x))


def _aliased(self: Any, h: Any) -> bool:
    check = isinstance
    return check(h, torch.Tensor)


def _attribute(self: Any, h: Any) -> bool:
    import builtins

    return builtins.isinstance(h, torch.Tensor)


def _partial(self: Any, h: Any) -> bool:
    import functools

    return functools.partial(isinstance)(h, torch.Tensor)


@pytest.mark.parametrize("hit", [_aliased, _attribute, _partial])
def test_isinstance_called_by_another_name_is_a_type_check(hit: Any) -> None:
    """Not proxy_types (hazards._inspects_type): ``isinstance`` reached by another name is taken
    for a C function's argument check, so the Proxy's answer (False) goes into the graph."""
    _assert_like_eager(_AnswersByFunction(hit))


class _ListingTensor(torch.Tensor):
    """A tensor subclass whose ``torch.relu`` and ``F.layer_norm`` return a list: the value is
    no tensor though the op's schema says so."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = super().__torch_function__(func, types, args, kwargs or {})
        return [out] if func in (torch.relu, torch.nn.functional.layer_norm) else out


@pytest.mark.parametrize("where", ["input", "parameter"])
def test_a_tensor_subclass_whose_torch_function_returns_a_list(where: str) -> None:
    torch.manual_seed(0)
    inner = _AnswersByFunction(_checks_list, by_module=where == "parameter")
    model, x = nn.Sequential(inner, nn.Identity()).eval(), torch.randn(2, 3, W)
    if where == "parameter":
        inner.norm.weight = nn.Parameter(torch.ones(W).as_subclass(_ListingTensor))
    else:
        x = x.as_subclass(_ListingTensor)
    with quiet_fallbacks():
        tapped = fxtap.tap(model, ["1"])
    assert_same(tapped(x)["1"].as_subclass(torch.Tensor), model(x).as_subclass(torch.Tensor))


def test_a_users_forward_put_on_a_torch_nn_class_is_not_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    original = nn.LayerNorm.forward

    def forward(self: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:  # annotated, and a list
        return [original(self, x)]  # type: ignore[return-value]

    monkeypatch.setattr(nn.LayerNorm, "forward", forward)
    _assert_like_eager(_AnswersByFunction(_checks_list, by_module=True))


def test_a_users_function_put_on_torch_tensor_is_not_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    original = torch.Tensor.transpose

    def transpose(self: torch.Tensor, *dims: int) -> torch.Tensor:  # annotated, and a list
        return [original(self, *dims)]  # type: ignore[return-value]

    monkeypatch.setattr(torch.Tensor, "transpose", transpose)
    _assert_like_eager(_ContainerCheck("method", "list"))
