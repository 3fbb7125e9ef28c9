"""Property: a cut of a model only the torch.export frontend captures equals the model with the cut
inputs' values replaced.

A random model (``strategies.cases``, eval mode) runs under ``ExportRoot`` (a root torch.fx cannot
trace), so ``fxtap.cut`` builds the cut from one torch.export graph. It is cut at a random module
output, adding the values it reports missing (skips) as a user would; each cut input is given a
value other than the model's own, and every output equals ``strategies.edited_truth`` (no fxtap:
forward hooks that return the given values). The given tensors are not changed by the call. Half
the examples call the cut at twice the example's batch size (a cut refuses sizes its graph holds
fixed, with an error that says so).
"""

from __future__ import annotations

import warnings

import torch
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st
from support.budget import examples
from support.strategies import Case, case_truth, cases, edited_truth
from support.toy_models import ExportRoot
from support.truth import assert_same

import fxtap

EXAMPLES = examples(6)  # each example exports once (twice when a skip is added)


def _build(root: ExportRoot, point: str, outputs: list[str], example: tuple[object, ...]) -> tuple[fxtap.Cut, list[str]] | None:
    inputs = [point]
    for _ in range(6):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", fxtap.FallbackWarning)
                return fxtap.cut(root, inputs, outputs, example=example), inputs
        except fxtap.CutError as error:
            if not error.missing:  # refused with a reason (a tuple, code inside a module no tap name names)
                return None
            assert not set(error.missing) & set(inputs), f"{error.missing} reported missing though given"
            inputs = inputs + list(error.missing)
    raise AssertionError(f"still missing values: {inputs}")


@settings(max_examples=EXAMPLES, deadline=None)
@given(case=cases(train=False), data=st.data())
def test_property_export_cut_equals_the_model_with_values_replaced(case: Case, data: st.DataObject) -> None:
    model, args, kwargs = case.build()
    assume(not kwargs)  # the example is the positional arguments
    truth = case_truth(model, args, kwargs)
    modules = [n for n in truth.modules if isinstance(truth.values.get(n), torch.Tensor) and truth.values[n].is_floating_point()]
    assume(modules)
    point = data.draw(st.sampled_from(modules), label="cut at")
    later = [n for n in modules[modules.index(point) + 1 :]]
    outputs = ["output", *data.draw(st.lists(st.sampled_from(later), max_size=2, unique=True), label="outputs")] if later else ["output"]
    root = ExportRoot(model)
    built = _build(root, f"inner.{point}", [o if o == "output" else f"inner.{o}" for o in outputs], args)
    assume(built is not None)
    assert built is not None
    cut, inputs = built
    names = [name.removeprefix("inner.") for name in inputs]
    if data.draw(st.booleans(), label="twice the example's batch"):  # a size the export saw as a symbol only
        doubled = tuple(torch.cat([a, a]) if isinstance(a, torch.Tensor) and a.dim() > 0 else a for a in args)
        try:
            truth = case_truth(model, doubled, kwargs)
        except Exception:  # noqa: BLE001 - the model does not take that batch (an argument without one)
            assume(False)
        args = doubled
        event("called at twice the example's batch")
    assume(all(isinstance(truth.values.get(n), torch.Tensor) and truth.values[n].is_floating_point() for n in names))
    replacements = {n: (truth.values[n] * 0.5 + 0.25).detach() for n in names}
    expected_out, expected = edited_truth(model, args, kwargs, {n: (lambda v, r=r: r.clone()) for n, r in replacements.items()})
    given_values = [replacements[n].clone() for n in names]
    extra = [args[int(name.removeprefix("args_"))] for name in cut.inputs[len(inputs) :]]
    with torch.no_grad():
        try:
            out = cut(*given_values, *extra)
        except fxtap.FxtapError as error:  # a size the graph holds fixed (a batch the model reshapes to): said, not wrong
            assert "exported at the example's sizes" in str(error), error
            event("refused: a size the graph holds fixed")
            assume(False)
    for name in outputs:
        want = expected_out if name == "output" else expected[name]
        assert_same(out[name if name == "output" else f"inner.{name}"], want, exact=False)
    assert_same(given_values, [replacements[n] for n in names])  # the caller's tensors are not written
