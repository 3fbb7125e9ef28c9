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
from hypothesis import assume, given
from hypothesis import strategies as st
from support import cuts
from support.strategies import Case, case_truth, cases
from support.truth import assert_same

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
