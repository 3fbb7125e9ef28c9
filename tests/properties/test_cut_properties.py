"""Property: on random models (``strategies.cases``, eval mode, FX-traceable), cutting at a random
name (plus the values ``fxtap.cut`` reports missing) and feeding the cut the true values of its
inputs gives the true outputs, exactly, and leaves those input tensors unchanged.

The truth is one eager forward (``strategies.case_truth``). The drawn models hold residuals
(out of place and in place), concatenations, views, shared modules called several times,
in-place ops through aliases and views after the cut point (the cut must copy its input),
tuple and dict outputs, and several model inputs (a cut takes those it still reads as arguments).
"""

from __future__ import annotations

import inspect
import warnings

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from support import cuts
from support.strategies import Case, Spec, case_truth, cases, edited_truth
from support.truth import assert_same
from torch import nn

import fxtap


@given(case=cases(train=False), data=st.data())
def test_property_cut_equals_truth(case: Case, data: st.DataObject) -> None:
    assume(case.signature != "x,y=,z=,scale=" or case.call == ("x",))  # a cut fixes non-tensor arguments at their defaults
    model, args, kwargs = case.build()
    truth = case_truth(model, args, kwargs)
    tensors = [n for n in truth.names if isinstance(truth.values[n], torch.Tensor)]
    point = data.draw(st.sampled_from(tensors), label="cut at")
    later = tensors[tensors.index(point) + 1 :]
    outputs = ["output", *data.draw(st.lists(st.sampled_from(later), max_size=2, unique=True), label="outputs")] if later else ["output"]
    built = cuts.build(model, point, outputs)
    assume(built is not None)  # refused: an in-place write the cut cannot reproduce (checked by name in cuts.build)
    assert built is not None
    cut, inputs = built
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
        tapped = fxtap.tap(model, inputs)(*args, **kwargs)
    given = [truth.values[n].clone() if n in truth.values else tapped[n] for n in inputs]
    kept = [v.clone() if isinstance(v, torch.Tensor) else v for v in given]
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    extra = [bound.arguments[name] for name in cut.inputs[len(inputs):]]
    out = cut(*given, *extra)
    assert list(out) == outputs
    for name in outputs:
        assert_same(out[name], truth.values[name])
    assert_same(given, kept)


def test_cut_at_the_last_call_before_an_in_place_write_outputs_the_written_value() -> None:
    """The thorough run's counterexample: cut at ``body.prod.2`` (the cut input that ``+=``
    then writes into, so the cut works on a copy made after every placeholder), asking for
    ``body.prod``: its snapshot was placed before that copy existed (a graph FX rejects)."""
    linear = Spec("linear")
    case = Case(body=Spec("inplace", (Spec("fresh", (linear, linear)),), "+=/none"), signature="x", call=("x",), out="tensor",
                root_untraceable=False, train=False, seed=0)  # fmt: skip
    model, args, kwargs = case.build()
    truth = case_truth(model, args, kwargs)
    built = cuts.build(model, "body.prod.2", ["output", "body.prod"])
    assert built is not None
    cut, inputs = built
    given = [truth.values[n].clone() for n in inputs]
    kept = [v.clone() for v in given]
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    out = cut(*given, *[bound.arguments[name] for name in cut.inputs[len(inputs) :]])
    for name in ["output", "body.prod"]:
        assert_same(out[name], truth.values[name])
    assert_same(given, kept)


# each example builds two cuts and runs the model three times: 50 in the default run, the
# "thorough" profile's own count otherwise (HYPOTHESIS_PROFILE=thorough)
EDIT_EXAMPLES = settings.default.max_examples if settings.default.max_examples > 200 else 50


class _Gain(nn.Module):
    """A trainable edit for values of any shape."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(0.75))

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return value * self.gain + 0.25


class _Affine:
    """A callable edit (a plain object, so hypothesis prints it)."""

    def __init__(self, a: float, b: float) -> None:
        self.a, self.b = a, b

    def __call__(self, value: torch.Tensor) -> torch.Tensor:
        return value * self.a + self.b

    def __repr__(self) -> str:
        return f"_Affine({self.a}, {self.b})"


@st.composite
def _edit(draw: st.DrawFn, value: torch.Tensor) -> object:
    kind = draw(st.sampled_from(("fn", "tensor", "module") if value.is_floating_point() else ("fn",)))
    if kind == "fn":
        return _Affine(draw(st.sampled_from((0.0, 0.5, -1.0))), draw(st.sampled_from((0.0, 1.0))))
    if kind == "module":
        return _Gain()
    return torch.randn(value.shape[-1:] if draw(st.booleans()) else value.shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))


def _as_fn(edit: object) -> object:
    """The same edit for the eager truth: a tensor replaces the value by a fresh copy."""
    if isinstance(edit, torch.Tensor):
        return lambda value: torch.broadcast_to(edit, torch.broadcast_shapes(edit.shape, value.shape)).clone()
    return edit


@settings(max_examples=EDIT_EXAMPLES)
@given(case=cases(train=False), data=st.data())
def test_property_cut_with_edits_equals_edited_truth(case: Case, data: st.DataObject) -> None:
    """Edits at or after the cut point (some on the cut input itself, which applies to the value
    given): the cut fed the model's own (unedited) input values returns the output of the model
    run eagerly with the edits (``edited_truth``: forward hooks, the op's own line); tensors
    handed in as edits are never written. An edit the cut refuses is one computed before a cut input."""
    assume(case.signature != "x,y=,z=,scale=" or case.call == ("x",))
    model, args, kwargs = case.build()
    truth = case_truth(model, args, kwargs)
    tensors = [n for n in truth.names if isinstance(truth.values[n], torch.Tensor)]
    point = data.draw(st.sampled_from(tensors), label="cut at")
    after = tensors[tensors.index(point) :]
    chosen = data.draw(st.lists(st.sampled_from(after), min_size=1, max_size=2, unique=True), label="edited")
    edits = {name: data.draw(_edit(truth.values[name]), label=f"edit of {name}") for name in chosen}
    kept_edits = {n: e.clone() for n, e in edits.items() if isinstance(e, torch.Tensor)}
    built = cuts.build(model, point, ["output"])
    assume(built is not None)
    assert built is not None
    inputs = built[1]
    try:
        cut = fxtap.cut(model, inputs, ["output"], edit=edits)
    except fxtap.CutError as error:  # an edit upstream of another cut input (a skip the cut takes as given), or
        # an edit module (unseen code: it may write into its argument) on memory a cut input shares with a value before the cut
        assert "computed before the cut" in str(error) or "writes into it in place" in str(error), error
        return
    expected, _ = edited_truth(model, args, kwargs, {n: _as_fn(e) for n, e in edits.items()})
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
        tapped = fxtap.tap(model, inputs)(*args, **kwargs)
    given = [truth.values[n].clone() if n in truth.values else tapped[n] for n in inputs]
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    extra = [bound.arguments[name] for name in cut.inputs[len(inputs) :]]
    with torch.no_grad():
        out = cut(*given, *extra)
    assert_same(out["output"], expected)
    for name, tensor in kept_edits.items():
        assert torch.equal(edits[name], tensor)  # type: ignore[arg-type]
