"""``fxtap.edit`` and ``tap(..., edit=)`` on small models: placement, errors, copies, export."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxtap
from fxtap._values import copy_value
from support.truth import assert_unchanged, model_fingerprint


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return self.out(h + x)


class InplaceAfter(nn.Module):
    """``fc``'s output is later written in place (``relu_``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h.relu_()
        return h * 2


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.gate = Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.fc(x))


class Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # a branch on a tensor's value: torch.fx cannot trace it
            return torch.relu(self.inner(x))
        return torch.relu(self.inner(-x))


def _quiet_edit(model: nn.Module, edits: dict, **options) -> fxtap.Edited:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
        return fxtap.edit(model, edits, **options)


def test_edit_callable_matches_code_with_the_edit_written_in() -> None:
    model, x = Block(), torch.randn(2, 4)
    edited = fxtap.edit(model, {"add": lambda v: v * 3})
    torch.testing.assert_close(edited(x), model.out((model.fc(x) + x) * 3), rtol=0, atol=0)
    assert edited.mode == "fx" and edited.paths == {"add": "fx"}


def test_edit_leaves_the_model_unchanged_also_after_an_error() -> None:
    model, x = Untraceable(), torch.randn(2, 4)
    before = model_fingerprint(model)

    def boom(value: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    edited = _quiet_edit(model, {"gate.inner": boom, "fc": torch.zeros(4)})
    with pytest.raises(RuntimeError, match="boom"):
        edited(x)
    assert_unchanged(before, model)
    assert not any("forward" in m.__dict__ for m in model.modules())  # no routed forward left behind


def test_edit_tensor_that_cannot_broadcast_names_the_edit_at_first_call() -> None:
    edited = fxtap.edit(Block(), {"fc": torch.zeros(3)})
    with pytest.raises(fxtap.FxtapError, match=r"edit 'fc': a tensor of shape \(3,\) cannot replace a value of shape \(2, 4\)"):
        edited(torch.randn(2, 4))


def test_edit_functional_op_in_untraceable_code_is_refused_with_the_nearest_module() -> None:
    with pytest.raises(fxtap.TapNameError, match=r"(?s)cannot edit 'gate.relu'.*runs eagerly.*nearest module whose output can be edited is 'gate'"):
        _quiet_edit(Untraceable(), {"gate.relu": torch.relu})


def test_edit_unknown_name_suggests_close_ones() -> None:
    with pytest.raises(fxtap.TapNameError, match="fcc"):
        fxtap.edit(Block(), {"fcc": torch.relu})


def test_edit_of_module_in_untraceable_code_uses_a_hook() -> None:
    model, x = Untraceable(), torch.randn(2, 4)
    edited = _quiet_edit(model, {"gate.inner": lambda v: v + 1, "fc": lambda v: v * 2})
    h = model.fc(x) * 2
    expected = torch.relu(model.gate.inner(h if h.sum() > 0 else -h) + 1)
    torch.testing.assert_close(edited(x), expected, rtol=0, atol=0)
    assert edited.paths == {"gate.inner": "hook", "fc": "fx"} and edited.mode == "mixed"
    assert "control flow" in edited.report()  # the reason gate runs eagerly
    with pytest.raises(fxtap.FxtapError, match="gate.inner"):
        edited.graph_module()


def test_edit_mode_fx_refuses_hooks() -> None:
    with pytest.raises((fxtap.TraceFailedError, fxtap.TapNameError)):
        fxtap.edit(Untraceable(), {"gate.inner": torch.relu}, mode="fx")


def test_edit_rejects_bad_edits() -> None:
    with pytest.raises(TypeError, match="edit 'fc'"):
        fxtap.edit(Block(), {"fc": 3})
    with pytest.raises(ValueError, match="empty"):
        fxtap.edit(Block(), {})
    with pytest.raises(ValueError, match="mode"):
        fxtap.edit(Block(), {"fc": torch.relu}, mode="graph")  # type: ignore[arg-type]


def test_edit_module_trains_while_the_model_is_shared() -> None:
    model, x = Block(), torch.randn(2, 4)
    adapter = nn.Linear(4, 4)
    edited = fxtap.edit(model, {"fc": adapter})
    own = {id(p) for p in edited.parameters()}
    assert {id(p) for p in adapter.parameters()} <= own and {id(p) for p in model.parameters()} <= own
    edited(x).sum().backward()
    expected = torch.autograd.grad(model.out(adapter(model.fc(x)) + x).sum(), adapter.weight)[0]
    torch.testing.assert_close(adapter.weight.grad, expected)


def test_edit_tap_of_edited_name_returns_the_value_after_the_edit() -> None:
    model, x = Block(), torch.randn(2, 4)
    taps = fxtap.tap(model, ["fc", "add"], edit={"fc": torch.ones(4)})(x)
    torch.testing.assert_close(taps["fc"], torch.ones(2, 4))
    torch.testing.assert_close(taps["add"], torch.ones(2, 4) + x)


def test_edit_patch_is_copied_only_where_an_inplace_op_writes_into_it() -> None:
    x, patch = torch.randn(2, 4), torch.randn(2, 4)
    saved = patch.clone()
    written = fxtap.edit(InplaceAfter(), {"fc": patch})
    torch.testing.assert_close(written(x), saved.relu() * 2)
    torch.testing.assert_close(patch, saved, rtol=0, atol=0)  # the user's tensor is never written
    assert copy_value.__name__ in written.graph_module().code
    read_only = fxtap.edit(Block(), {"fc": patch})
    assert copy_value.__name__ not in read_only.graph_module().code
    hooked = _quiet_edit(InplaceAfter(), {"fc": patch}, mode="hooks")
    hooked(x)
    torch.testing.assert_close(patch, saved, rtol=0, atol=0)


def test_edit_exports_and_compiles() -> None:
    model, x = Block().eval(), torch.randn(2, 4)
    edited = fxtap.edit(model, {"add": lambda v: v * 0.5, "fc": torch.ones(4)})
    expected = edited(x)
    exported = torch.export.export(edited, (x,))
    torch.testing.assert_close(exported.module()(x), expected)
    compiled = torch.compile(edited, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), expected)


class _Gain(nn.Module):
    """A trainable edit module."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(0.75))

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return value * self.gain


@pytest.mark.slow  # inductor compiles C++ for the CPU: about half a minute on a quiet 2-core machine
def test_edit_compiles_fullgraph_with_inductor_on_cpu() -> None:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("inductor on the CPU needs a C compiler")
    torch._dynamo.reset()
    model, x, patch = Block().eval(), torch.randn(2, 4), torch.randn(2, 4)
    gain = _Gain()
    edited = fxtap.edit(model, {"add": lambda v: v * 0.5, "fc": torch.ones(4), "out": gain})
    tapped = fxtap.tap(model, ["add", "out"], edit={"add": lambda v: v * 0.5, "fc": torch.ones(4)})
    written = fxtap.edit(InplaceAfter(), {"fc": patch})  # a later relu_ writes into the patched value: a copy in the graph
    saved = patch.clone()
    with torch.no_grad():
        add = (torch.ones(2, 4) + x) * 0.5  # by hand: fc's output replaced by ones, the add halved
        torch.testing.assert_close(torch.compile(edited, fullgraph=True)(x), model.out(add) * 0.75)
        taps = torch.compile(tapped, fullgraph=True)(x)
        torch.testing.assert_close(taps["add"], add)
        torch.testing.assert_close(taps["out"], model.out(add))
        torch.testing.assert_close(torch.compile(written, fullgraph=True)(x), saved.relu() * 2)
    torch.testing.assert_close(patch, saved, rtol=0, atol=0)  # the compiled copy kept the user's tensor unwritten
    out = torch.compile(edited, fullgraph=True)(x)
    out.sum().backward()
    assert gain.gain.grad is not None and gain.gain.grad != 0  # the edit module trains through the compiled graph


def test_export_writes_edited_graph(tmp_path) -> None:
    model, x = Block().eval(), torch.randn(2, 4)
    path = fxtap.export(model, ["out"], x, tmp_path / "edited.pt2", edit={"add": lambda v: v * 0.5})
    loaded = torch.export.load(path).module()
    torch.testing.assert_close(loaded(x)["out"], model.out((model.fc(x) + x) * 0.5))
    pytest.importorskip("onnxruntime")
    onnx = fxtap.export(model, ["out"], x, tmp_path / "edited.onnx", edit={"add": lambda v: v * 0.5, "fc": torch.ones(4)})
    assert onnx.exists()  # fxtap.export checked the file against the graph, with a dynamic batch
    with pytest.raises(fxtap.FxtapError, match="gate.inner"):
        fxtap.export(Untraceable().eval(), ["fc"], x, tmp_path / "no.pt2", edit={"gate.inner": F.relu})


def test_edit_prunes_like_taps() -> None:
    model = InplaceAfter()
    tapped = fxtap.tap(model, ["fc"], edit={"fc": lambda v: v + 1})
    code = tapped.graph_module().code
    assert "relu_" not in code and "mul" not in code  # nothing after the tap runs


class _Twice(nn.Module):
    """Untraceable (a data-dependent loop): an opaque leaf of the graph, its ``f`` edited by a hook."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(1 + int(x.sum() > 0)):
            x = self.f(x)
        return x


class _GateThenLoop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(4, 4)
        self.body = _Twice()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate(x))
        return self.body(x * g)


def test_tap_with_an_edit_inside_a_leaf_that_the_taps_do_not_need() -> None:
    # found by the thorough edit-property run: the taps need only 'gate' and 'sigmoid', so the
    # pruned graph never calls the opaque leaf 'body', and its hook edit of 'body.f' found no
    # call: a MissingCallError, although the taps are the eager values (the edit is downstream)
    torch.manual_seed(0)
    model, x = _GateThenLoop().eval(), torch.randn(2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
        tapped = fxtap.tap(model, ["gate", "sigmoid"], edit={"body.f": lambda v: v * 0})
        edited = fxtap.edit(model, {"body.f": lambda v: v * 0})
    got = tapped(x)
    torch.testing.assert_close(got["gate"], model.gate(x), rtol=0, atol=0)
    torch.testing.assert_close(got["sigmoid"], torch.sigmoid(model.gate(x)), rtol=0, atol=0)
    assert tapped.paths == {"gate": "fx", "sigmoid": "fx"}
    calls: list[int] = []
    handle = model.body.f.register_forward_hook(lambda m, i, o: (calls.append(1), o * 0 if len(calls) == 1 else None)[1])
    try:
        expected = model(x)  # by hand: the first call of body.f zeroed
    finally:
        handle.remove()
    torch.testing.assert_close(edited(x), expected, rtol=0, atol=0)  # the output needs the leaf: the edit applies
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
        third = fxtap.edit(model, {"body.f_2": lambda v: v * 0})
    with pytest.raises(fxtap.MissingCallError, match="found no call to edit"):
        third(x)  # a leaf the graph calls, whose third call never happens: still an error
