"""fxtap.cut on models only the torch.export frontend captures (issue 17): the cut is built from one
torch.export graph of the model's call with each cut input replaced by the cut's argument.

The truth is never fxtap's cut: it is the full model run eagerly with plain forward hooks that
*replace* the cut inputs' module outputs by the given values (``_replaced``), and that clone the
outputs' module outputs at their moment. A cut computes exactly that, on other batch and sequence
sizes than its example, without changing the caller's tensors or the model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from support.registry import CASES
from support.toy_models import ExportRoot
from support.truth import (
    assert_same,
    assert_unchanged,
    model_fingerprint,
    quiet_fallbacks,
)
from torch import nn

import fxtap


# -- models: an FX-traceable body under a root FX cannot trace --------------------------------------------
class Body(nn.Module):
    def __init__(self, skip: bool | str = False) -> None:
        super().__init__()
        self.skip = skip
        self.a, self.bn, self.b = nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 8)
        self.bn2, self.drop, self.c = nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.a(x))
        if self.skip == "op":
            h = h * 2  # body.mul: an op of body's own code, which a skip reads below
        y = torch.relu_(self.b(h))  # in place, right after the cut at "body.b"
        z = self.bn2(y)
        if self.skip == "op":
            z = z + h  # a skip from before the cut: body.mul
        elif self.skip:
            z = z + h  # a skip from before the cut: body.bn's output
        return self.c(self.drop(z))


class Root(nn.Module):
    """A root torch.fx cannot trace (a Python bool of a size) and torch.export can."""

    def __init__(self, body: nn.Module, mode: str = "") -> None:
        super().__init__()
        self.body, self.mode = body, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return x
        if self.mode == "scaled":  # the root's own code before the cut: run again by the cut, from x
            h = x * 2.0
            return self.body(h) + h.mean(-1, keepdim=True)
        out = self.body(x)
        if self.mode == "residual":  # a model input read after the cut
            out = out + x.sum(-1, keepdim=True)
        return out


def _model(*, skip: bool | str = False, mode: str = "", train: bool = False) -> Root:
    torch.manual_seed(0)
    model = Root(Body(skip), mode)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    return model.train(train)


def _replaced(model: nn.Module, given: dict[str, torch.Tensor], outputs: list[str], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """The truth: the model with forward hooks returning ``given[path]`` for those modules, and
    cloning the outputs (module paths, or "output") as they are returned."""
    seen: dict[str, Any] = {}
    handles = [model.get_submodule(path).register_forward_hook(lambda m, i, o, v=value: v.clone()) for path, value in given.items()]

    def keep(path: str) -> Callable[..., None]:
        return lambda m, i, o: seen.__setitem__(path, o.detach().clone() if isinstance(o, torch.Tensor) else o)

    handles += [model.get_submodule(path).register_forward_hook(keep(path)) for path in outputs if path != "output"]
    try:
        seen["output"] = model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: seen[name] for name in outputs}


def _cut(model: nn.Module, inputs: Any, outputs: Any = ("output",), **options: Any) -> fxtap.Cut:
    with quiet_fallbacks():
        return fxtap.cut(model, inputs, outputs, **options)


# -- equal to the model with the value replaced -----------------------------------------------------------
def test_export_cut_equals_the_model_with_the_value_replaced_and_changes_nothing() -> None:
    model = _model()
    before = model_fingerprint(model)
    cut = _cut(model, ["body.b"], ["body.bn2", "output"], example=torch.randn(4, 8))
    assert cut.inputs == ["body.b"] and cut.outputs == ["body.bn2", "output"]
    assert_unchanged(before, model)  # no hooks left, buffers and parameters as they were
    value = torch.randn(6, 8)  # another batch size than the example
    kept = value.clone()
    with torch.no_grad():
        out = cut(value)
        truth = _replaced(model, {"body.b": kept}, ["body.bn2", "output"], torch.randn(6, 8))
    assert torch.equal(value, kept)  # relu_ right after the cut worked on a copy
    torch.testing.assert_close(out["body.bn2"], truth["body.bn2"], rtol=0, atol=0)
    torch.testing.assert_close(out["output"], truth["output"], rtol=0, atol=0)
    assert_unchanged(before, model)
    parameters = dict(cut.graph_module().named_parameters())
    assert parameters["call.model.body.c.weight"] is model.body.c.weight  # shared, not copied
    assert not [n for n in parameters if ".a." in n or ".bn." in n]  # the prefix is not in the graph


def test_export_cut_outputs_are_the_values_at_their_moment() -> None:
    model = _model()
    cut = _cut(model, ["body.a"], ["body.b", "output"], example=torch.randn(4, 8))  # relu_ overwrites body.b later
    value = torch.randn(5, 8)
    with torch.no_grad():
        out = cut(value)
        truth = _replaced(model, {"body.a": value}, ["body.b", "output"], torch.randn(5, 8))
    assert (out["body.b"] < 0).any()  # before the relu_
    torch.testing.assert_close(out["body.b"], truth["body.b"], rtol=0, atol=0)
    torch.testing.assert_close(out["output"], truth["output"], rtol=0, atol=0)


def test_export_cut_skip_that_bypasses_the_cut_lists_the_module_to_add() -> None:
    model = _model(skip=True)
    with pytest.raises(fxtap.CutError) as caught:
        _cut(model, ["body.b"], example=torch.randn(4, 8))
    assert caught.value.missing == ["body.bn"]
    assert "fxtap.cut(model, ['body.b', 'body.bn'], ...)" in str(caught.value)
    cut = _cut(model, ["body.b", "body.bn"], example=torch.randn(4, 8))
    b, bn = torch.randn(3, 8), torch.randn(3, 8)
    with torch.no_grad():
        truth = _replaced(model, {"body.b": b, "body.bn": bn}, ["output"], torch.randn(3, 8))
        assert torch.equal(cut(b, bn)["output"], truth["output"])


def test_export_cut_skip_from_an_op_inside_a_module_names_the_op() -> None:
    model = _model(skip="op")
    with pytest.raises(fxtap.CutError) as caught:
        _cut(model, ["body.b"], example=torch.randn(4, 8))
    assert caught.value.missing == ["body.mul"]
    cut = _cut(model, ["body.b", "body.mul"], example=torch.randn(4, 8))
    b, doubled, x = torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8)
    with torch.no_grad(), quiet_fallbacks():
        truth = fxtap.tap(model, ["body.c"], edit={"body.b": b, "body.mul": doubled})(x)  # tap(edit=) equals hooks (tests/capture)
        assert torch.equal(cut(b, doubled)["output"], truth["body.c"])


class Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.a(x)
        return self.c(self.b(h)), h


class PairRoot(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Pair()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return x
        out, aux = self.inner(x)
        return out + aux


def test_export_cut_skip_out_of_a_tuple_is_named_by_the_module_that_returns_it_alone() -> None:
    torch.manual_seed(0)
    model = PairRoot().eval()
    with pytest.raises(fxtap.CutError) as caught:
        _cut(model, ["inner.b"], example=torch.randn(4, 8))
    assert caught.value.missing == ["inner.a"]  # 'inner' returns it too, inside a tuple: not a cut input
    cut = _cut(model, ["inner.b", "inner.a"], example=torch.randn(4, 8))
    b, a = torch.randn(3, 8), torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(cut(b, a)["output"], _replaced(model, {"inner.b": b, "inner.a": a}, ["output"], torch.randn(3, 8))["output"])


def test_export_cut_output_before_the_cut_is_refused() -> None:
    with pytest.raises(fxtap.CutError, match="computed before the cut") as caught:
        _cut(_model(), ["body.b"], ["body.a", "output"], example=torch.randn(4, 8))
    assert caught.value.missing == ["body.a"]


def test_export_cut_takes_model_inputs_the_rest_reads_and_runs_the_roots_own_code_again() -> None:
    model = _model(mode="residual")
    cut = _cut(model, {"body.b": "features"}, example=torch.randn(4, 8))
    assert cut.inputs == ["features", "x"]  # out + x.sum(...) after the cut
    x, value = torch.randn(5, 8), torch.randn(5, 8)
    with torch.no_grad():
        assert torch.equal(cut(value, x=x)["output"], _replaced(model, {"body.b": value}, ["output"], x)["output"])
    scaled = _model(mode="scaled")  # h = x * 2 in the root's forward, read again after the cut
    cut = _cut(scaled, ["body.b"], example=torch.randn(4, 8))
    assert cut.inputs == ["body.b", "x"]
    with torch.no_grad():
        assert torch.equal(cut(value, x)["output"], _replaced(scaled, {"body.b": value}, ["output"], x)["output"])


def test_export_cut_train_mode_runs_state_writes_after_the_cut_only() -> None:
    model = _model(train=True)
    twin = copy.deepcopy(model)
    initial = {name: b.clone() for name, b in model.named_buffers()}
    example = torch.randn(4, 8)
    rng = torch.random.get_rng_state()
    cut = _cut(model, ["body.b"], ["body.bn2", "output"], example=example)
    assert torch.equal(torch.random.get_rng_state(), rng)  # building draws nothing from the caller's generator
    for name, buffer in model.named_buffers():  # building changes no buffer
        assert torch.equal(buffer, initial[name]), name
    for step in range(3):
        value, x = torch.randn(5, 8), torch.randn(5, 8)
        torch.manual_seed(step)
        out = cut(value)
        torch.manual_seed(step)  # the prefix draws nothing: the same dropout mask
        truth = _replaced(twin, {"body.b": value}, ["body.bn2", "output"], x)
        torch.testing.assert_close(out["output"], truth["output"], rtol=0, atol=0)
        torch.testing.assert_close(out["body.bn2"], truth["body.bn2"], rtol=0, atol=0)
    for name in ["running_mean", "running_var", "num_batches_tracked"]:
        assert torch.equal(getattr(model.body.bn2, name), getattr(twin.body.bn2, name)), name  # after the cut: as eager
        assert torch.equal(getattr(model.body.bn, name), initial[f"body.bn.{name}"]), name  # before it: never runs
    assert model.body.bn2.num_batches_tracked.item() == 3


class SideBranch(nn.Module):
    """A batch norm on the model input beside the cut: run when the output needs it (as on FX)."""

    def __init__(self, used: bool) -> None:
        super().__init__()
        self.used = used
        self.a, self.b, self.bn, self.side = nn.Linear(8, 8), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return x
        y = self.bn(self.b(self.a(x)))
        s = self.side(x)
        return y + s if self.used else y


@pytest.mark.parametrize("used", [True, False])
def test_export_cut_state_writes_beside_the_cut_run_with_their_module(used: bool) -> None:
    torch.manual_seed(0)
    model = SideBranch(used).train()
    twin = copy.deepcopy(model)
    cut = _cut(model, ["b"], example=torch.randn(4, 8))
    assert cut.inputs == (["b", "x"] if used else ["b"])
    value, x = torch.randn(5, 8), torch.randn(5, 8)
    out = cut(value, x) if used else cut(value)
    torch.testing.assert_close(out["output"], _replaced(twin, {"b": value}, ["output"], x)["output"], rtol=0, atol=0)
    for name in ["running_mean", "running_var", "num_batches_tracked"]:
        assert torch.equal(getattr(model.bn, name), getattr(twin.bn, name)), name
        if used:  # side(x) runs: its statistics move as in eager
            assert torch.equal(getattr(model.side, name), getattr(twin.side, name)), name
        else:  # nothing the cut returns needs side(x): it does not run, counter included
            assert not torch.equal(getattr(model.side, name), getattr(twin.side, name)), name


class Counter(nn.Module):
    """The root's own code updates a buffer before the cut, and the rest reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return x
        self.calls.add_(1)
        return self.b(self.a(x)) * self.calls


def test_export_cut_reading_state_updated_before_the_cut_is_refused() -> None:
    with pytest.raises(fxtap.CutError, match="'calls' as the model updates it before the cut"):
        _cut(Counter(), ["b"], example=torch.randn(4, 8))


def test_export_cut_follows_train_and_eval_with_one_graph_each() -> None:
    model = _model()
    cut = _cut(model, ["body.b"], example=torch.randn(4, 8))
    value = torch.randn(5, 8)
    with torch.no_grad():
        evaluated = cut(value)["output"]
        model.train()
        torch.manual_seed(0)
        trained = cut(value)["output"]
        model.eval()  # bn2's statistics moved in train mode: eval reads them
        assert torch.equal(cut(value)["output"], _replaced(model, {"body.b": value}, ["output"], torch.randn(5, 8))["output"])
    assert set(cut._splits) == {False, True}
    assert not torch.equal(trained, evaluated)


def test_export_cut_gradients_equal_the_models() -> None:
    model = _model()
    cut = _cut(model, ["body.b"], example=torch.randn(4, 8))
    value = torch.randn(5, 8, requires_grad=True)
    cut(value)["output"].square().sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    given_grad = value.grad.clone()
    model.zero_grad(set_to_none=True)
    value.grad = None
    truth = _replaced(model, {"body.b": value}, ["output"], torch.randn(5, 8))["output"]
    truth.square().sum().backward()
    assert set(grads) == {name for name, p in model.named_parameters() if p.grad is not None} == {
        f"body.{m}.{p}" for m in ("bn2", "c") for p in ("weight", "bias")
    }
    for name, grad in grads.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, rtol=0, atol=0)
    torch.testing.assert_close(given_grad, value.grad, rtol=0, atol=0)


def test_export_cut_trains_through_batch_norm_in_train_mode() -> None:
    model = _model(train=True)
    twin = copy.deepcopy(model)
    cut = _cut(model, ["body.b"], example=torch.randn(4, 8))
    value = torch.randn(5, 8, requires_grad=True)
    torch.manual_seed(0)
    cut(value)["output"].square().sum().backward()  # the running statistics autograd saved are not overwritten
    given = value.grad.clone()
    value.grad = None
    x = torch.randn(5, 8)
    torch.manual_seed(0)  # the same dropout mask: the prefix draws nothing
    _replaced(twin, {"body.b": value}, ["output"], x)["output"].square().sum().backward()
    torch.testing.assert_close(given, value.grad, rtol=0, atol=0)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    assert not any(b.requires_grad for b in model.buffers())
    torch.testing.assert_close(model.body.bn2.running_mean, twin.body.bn2.running_mean, rtol=0, atol=0)


def test_export_cut_keys_that_spell_the_same_identifier() -> None:
    model = _model(skip=True)
    cut = _cut(model, {"body.b": "a.b", "body.bn": "a_b"}, example=torch.randn(4, 8))
    b, bn = torch.randn(3, 8), torch.randn(3, 8)
    with torch.no_grad():
        truth = _replaced(model, {"body.b": b, "body.bn": bn}, ["output"], torch.randn(3, 8))["output"]
        assert torch.equal(cut(b, bn)["output"], truth)
        assert torch.equal(cut.graph_module()(b, bn)["output"], truth)
        assert torch.equal(cut(**{"a.b": b, "a_b": bn})["output"], truth)


def test_export_cut_graph_module_and_shape_checks() -> None:
    model = _model(mode="residual")
    cut = _cut(model, ["body.b"], example=torch.randn(4, 8))
    graph = cut.graph_module()
    value, x = torch.randn(3, 8), torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(graph(value, x)["output"], cut(value, x)["output"])
    with pytest.raises(fxtap.FxtapError, match="dim 0 is 2, but must equal 3"):
        cut(value, torch.randn(2, 8))  # the batch of the cut input and of x must be equal
    with pytest.raises(fxtap.FxtapError, match="dim 1 is 9, the graph holds 8"):
        cut(torch.randn(3, 9), x)
    with pytest.raises(fxtap.FxtapError, match="is torch.float64, the graph holds torch.float32"):
        cut(value.double(), x)
    with pytest.raises(fxtap.FxtapError, match="outside the range"):
        cut(torch.randn(1, 8), torch.randn(1, 8))  # torch.export keeps a size of 1 out of a dynamic dimension


@pytest.mark.parametrize("suffix", ["pt2", pytest.param("onnx", marks=pytest.mark.slow)])
def test_export_cut_writes_pt2_and_onnx(tmp_path: Path, suffix: str) -> None:
    model = _model(mode="residual")
    cut = _cut(model, ["body.b"], example=torch.randn(4, 8))
    value, x = torch.randn(3, 8), torch.randn(3, 8)
    path = fxtap.export(cut, None, (value, x), tmp_path / f"cut.{suffix}")  # checks the file against the cut
    assert path.exists()
    with torch.no_grad():
        assert torch.equal(cut(value, x)["output"], _replaced(model, {"body.b": value}, ["output"], x)["output"])


class ValueBranch(nn.Module):
    """A root neither torch.fx nor torch.export can capture: it branches on a tensor's value."""

    def __init__(self) -> None:
        super().__init__()
        self.body = Body()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return out if out.sum() > 0 else -out


def test_export_cut_of_a_model_torch_export_cannot_capture_is_refused_and_changes_nothing() -> None:
    torch.manual_seed(0)
    model = ValueBranch().eval()
    before = model_fingerprint(model)
    with pytest.raises(fxtap.TraceFailedError, match="torch.export of the cut call failed") as caught:
        _cut(model, ["body.b"], example=torch.randn(4, 8))
    assert "fxtap.tap(model, outputs, edit={'body.b': value})" in str(caught.value)
    assert_unchanged(before, model)  # no hooks left behind after the failure


def test_export_cut_needs_an_example_and_mode_fx_refuses() -> None:
    model = _model()
    with pytest.raises(fxtap.TraceFailedError, match=r"(?s)without example=.*example=model_inputs"):
        _cut(model, ["body.b"])
    with pytest.raises(fxtap.TraceFailedError, match="a cut is one torch.fx graph"):
        _cut(model, ["body.b"], mode="fx", example=torch.randn(4, 8))
    with pytest.raises(fxtap.TraceFailedError, match="function edit"):
        _cut(model, ["body.b"], edit={"body.c": torch.tanh}, example=torch.randn(4, 8))


def test_export_cut_with_tensor_and_module_edits_equals_the_model_edited_by_hooks() -> None:
    model = _model()
    torch.manual_seed(1)
    steer = nn.Linear(8, 8)  # a module edit: its parameters train with the cut
    patch = torch.randn(4)  # a tensor edit of the last layer, broadcast over the batch
    given = nn.Linear(8, 8)  # an edit of the cut input: applies to the value given to the cut
    edits = {"body.bn2": steer, "body.c": patch, "body.b": given}
    cut = _cut(model, ["body.b"], ["body.bn2", "output"], example=torch.randn(4, 8), edit=edits)
    assert set(dict(cut.named_parameters())) >= {f"edits.e{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    value = torch.randn(5, 8)
    out = cut(value)
    hooks = [
        model.body.b.register_forward_hook(lambda m, i, o: given(value)),
        model.body.bn2.register_forward_hook(lambda m, i, o: steer(o)),
        model.body.c.register_forward_hook(lambda m, i, o: patch.expand_as(o).clone()),
    ]
    seen: dict[str, torch.Tensor] = {}
    hooks.append(model.body.bn2.register_forward_hook(lambda m, i, o: seen.update(bn2=o)))  # after the steer hook: the edited value
    try:
        truth = model(torch.randn(5, 8))
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(out["output"], truth, rtol=0, atol=0)
    torch.testing.assert_close(out["body.bn2"], seen["bn2"], rtol=0, atol=0)
    out["body.bn2"].sum().backward()
    assert steer.weight.grad is not None and given.weight.grad is not None  # the edits' parameters get gradients
    with torch.no_grad():
        patch.mul_(2)  # a tensor edit is read live, as on FX: the output (body.c's) is the new patch
        torch.testing.assert_close(cut(value)["output"], patch.expand(5, 4), rtol=0, atol=0)
    with pytest.raises(fxtap.CutError, match="computed before the cut"):
        _cut(model, ["body.b"], example=torch.randn(4, 8), edit={"body.a": torch.zeros(8)})


# -- Hugging Face models --------------------------------------------------------------------------------
def _hf(name: str) -> nn.Module:
    return CASES[f"transformers/{name}"].build().eval()


def _tokens(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length - 3 :] = 0  # padding: the mask matters
    return torch.randint(0, 100, (batch, length), generator=generator), mask


def _check_hf(model: nn.Module, point: str, outputs: list[str], inputs: list[str]) -> None:
    example_ids, example_mask = _tokens(2, 8, 0)
    cut = _cut(model, [point], outputs, example={"input_ids": example_ids, "attention_mask": example_mask})
    assert cut.inputs == [point, *inputs]
    ids, mask = _tokens(3, 11, 1)  # other batch and sequence sizes than the example
    with torch.no_grad():
        other, other_mask = _tokens(3, 11, 2)
        value = _replaced(model, {}, [point], other, attention_mask=other_mask)[point]  # a value from another sentence
        value = value[0] if isinstance(value, tuple) else value
        arguments = {"input_ids": ids, "attention_mask": mask}
        out = cut(value.clone(), **{name: arguments[name] for name in inputs})
        truth = _replaced(model, {point: value}, outputs, ids, attention_mask=mask)
    for name in outputs:
        got, want = out[name], truth[name]
        if name == "output":
            assert type(got) is type(want)
            got, want = got[0], want[0]
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.slow  # 4.5 s; docs/cut.md cuts BertModel at a middle layer by default
def test_export_cut_bert_middle_layer() -> None:
    _check_hf(_hf("BertModel"), "encoder.layer.0", ["encoder.layer.1", "output"], ["attention_mask"])


@pytest.mark.slow
def test_export_cut_llama_middle_layer_reads_sizes_from_the_cut_input() -> None:
    model = _hf("LlamaModel")
    _check_hf(model, "layers.0", ["layers.1", "norm"], ["attention_mask"])
    cut = _cut(model, ["layers.0"], ["norm"], example=torch.randint(0, 100, (2, 8)))
    assert cut.inputs == ["layers.0"]  # positions need the sequence length only: the cut input's
    value = torch.randn(3, 11, 32)
    with torch.no_grad():
        truth = _replaced(model, {"layers.0": value}, ["norm"], torch.randint(0, 100, (3, 11)))
        torch.testing.assert_close(cut(value)["norm"], truth["norm"], rtol=0, atol=0)


@pytest.mark.slow
def test_export_cut_llama_inside_a_layer_names_the_residual_sum() -> None:
    model = _hf("LlamaModel")
    example = torch.randint(0, 100, (2, 8))
    with pytest.raises(fxtap.CutError) as caught:
        _cut(model, ["layers.0.mlp"], ["layers.1"], example=example)
    assert caught.value.missing == ["layers.0.add"]  # the first residual sum, an op of the decoder layer's own code
    cut = _cut(model, ["layers.0.mlp", "layers.0.add"], ["layers.1"], example=example)
    mlp, residual, ids = torch.randn(3, 11, 32), torch.randn(3, 11, 32), torch.randint(0, 100, (3, 11))
    with torch.no_grad(), quiet_fallbacks():
        truth = fxtap.tap(model, ["layers.1"], edit={"layers.0.mlp": mlp, "layers.0.add": residual})(ids)["layers.1"]
        torch.testing.assert_close(cut(mlp, residual)["layers.1"], truth, rtol=0, atol=0)


@pytest.mark.slow  # docs/cut.md runs the same cut by default
def test_export_cut_bert_inside_a_layer_lists_the_skip() -> None:
    model = _hf("BertModel")
    with pytest.raises(fxtap.CutError) as caught:
        _cut(model, ["encoder.layer.0.attention.output.dense"], ["encoder.layer.0"], example=torch.randint(0, 100, (2, 8)))
    assert caught.value.missing == ["embeddings"]  # the attention block's residual reads the layer's input
    with pytest.raises(fxtap.CutError, match="must be one tensor"):
        _cut(model, ["encoder.layer.0.attention.self"], ["encoder.layer.0"], example=torch.randint(0, 100, (2, 8)))


@pytest.mark.slow
def test_export_cut_gpt2_middle_layer() -> None:
    _check_hf(_hf("GPT2Model"), "h.0", ["h.1", "ln_f"], ["attention_mask"])


@pytest.mark.slow
def test_export_cut_gpt2_output_with_a_cache_is_refused_and_without_it_works() -> None:
    model = _hf("GPT2Model")  # use_cache=True: the output holds layer h.0's keys and values, computed before the cut
    ids = torch.randint(0, 100, (2, 8))
    with pytest.raises(fxtap.CutError, match="use_cache=False") as caught:
        _cut(model, ["h.0"], ["output"], example=ids)
    assert caught.value.missing == []
    cut = _cut(model, ["h.0"], ["output"], example={"input_ids": ids, "use_cache": False})
    value, other = torch.randn(3, 11, 32), torch.randint(0, 100, (3, 11))
    with torch.no_grad():
        truth = _replaced(model, {"h.0": value}, ["output"], other, use_cache=False)["output"]
        out = cut(value)["output"]
    assert type(out) is type(truth) and out.past_key_values is None
    torch.testing.assert_close(out.last_hidden_state, truth.last_hidden_state, rtol=0, atol=0)
    # cut before every layer: the cache the output holds is all computed after the cut, made anew per call
    cut = _cut(model, ["drop"], ["output"], example=ids)
    with torch.no_grad():
        truth = _replaced(model, {"drop": value}, ["output"], other)["output"]
        out = cut(value)["output"]
    assert type(out.past_key_values) is type(truth.past_key_values) and len(out.past_key_values.layers) == 2
    for got, want in zip(out.past_key_values.layers, truth.past_key_values.layers):
        torch.testing.assert_close(got.keys, want.keys, rtol=0, atol=0)
        torch.testing.assert_close(got.values, want.values, rtol=0, atol=0)
    torch.testing.assert_close(out.last_hidden_state, truth.last_hidden_state, rtol=0, atol=0)


@pytest.mark.slow
def test_export_cut_vit_middle_layer() -> None:
    model = _hf("ViTModel")
    cut = _cut(model, ["layers.0"], ["layers.1", "output"], example=torch.randn(2, 3, 32, 32))
    assert cut.inputs == ["layers.0"]
    value = torch.randn(3, 17, 32)  # another batch; 16 patches and the class token
    with torch.no_grad():
        out = cut(value)
        truth = _replaced(model, {"layers.0": value}, ["layers.1", "output"], torch.randn(3, 3, 32, 32))
    torch.testing.assert_close(out["layers.1"], truth["layers.1"], rtol=0, atol=0)
    torch.testing.assert_close(out["output"][0], truth["output"][0], rtol=0, atol=0)


def test_cut_way_out_patches_the_value_in_one_export_graph() -> None:
    """What tap(..., edit=) gives (the mixed-mode alternative to a cut) equals plain hooks too."""
    model = _hf("BertModel")
    sentence, other = torch.randint(0, 100, (2, 8)), torch.randint(0, 100, (2, 8))
    with quiet_fallbacks():
        value = fxtap.tap(model, ["encoder.layer.0"])(other)["encoder.layer.0"].detach()
        patched = fxtap.tap(model, ["encoder.layer.1"], edit={"encoder.layer.0": value})
    with torch.no_grad():
        truth = _replaced(model, {"encoder.layer.0": value}, ["encoder.layer.1"], sentence)
        patched(sentence)
        out = patched(sentence)
    assert patched.mode == "export"
    torch.testing.assert_close(out["encoder.layer.1"], truth["encoder.layer.1"], rtol=0, atol=0)


@pytest.mark.parametrize("root", ["fx", "export"])
def test_cut_sees_a_model_changed_after_cut(root: str) -> None:
    # the cut's graph is cut again when a submodule or a parameter of the model is swapped after
    # cut() (as tap's graphs are), on both paths; in-place changes reach the graph as they are
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh())
    model, prefix = (inner, "") if root == "fx" else (ExportRoot(inner), "inner.")
    x = torch.randn(3, 4)
    cut = fxtap.cut(model, [prefix + "1"], example=(x,))
    h = inner[1](inner[0](x))
    with torch.no_grad():
        assert_same(cut(h)["output"], inner[3](inner[2](h)))
        inner[2] = nn.Linear(4, 4)  # swapped after cut()
        assert_same(cut(h)["output"], inner[3](inner[2](h)))
        inner[2].weight = nn.Parameter(torch.randn(4, 4))  # a parameter reassigned
        assert_same(cut(h)["output"], inner[3](inner[2](h)))
        inner[2].weight.mul_(2)  # in place
        assert_same(cut(h)["output"], inner[3](inner[2](h)))
    assert set(cut._splits) == {model.training}  # still one graph for the mode, cut again in place


def test_cut_sees_the_model_change_dtype_in_place() -> None:
    # model.double() keeps the Parameter objects; the export graph baked float32 in (finfo): cut again
    from support.toy_models import DtypeBaked

    torch.manual_seed(0)
    inner = DtypeBaked()
    model = ExportRoot(inner)
    ids = torch.tensor([[1, 2, 3]])
    cut = fxtap.cut(model, ["inner.emb"], example=(ids,))
    with torch.no_grad():
        assert_same(cut(inner.emb(ids))["output"], inner(ids))
        model.double()
        assert_same(cut(inner.emb(ids))["output"], inner(ids))
