"""Property: ``fxtap.names(model, inputs)`` is exactly what one call with those inputs produces.

On random models (``strategies.cases(untraceable=True)``: eager roots and children, branches on
values and on ``self.training``, modules called two or three times, hooks, dropout, batch norm),
with truth from plain forward hooks and the models' own op records (``case_truth``):

* its module calls are exactly the truth's module calls (later calls included), and it holds
  every functional op the truth recorded in traced code;
* every name ``fxtap.names(model)`` lists that it leaves out raises ``MissingCallError`` (or
  ``TapNameError``: a name of the default arguments' graph, not of this call's) when tapped
  alone: tapping all static names leniently keeps exactly its names;
* ``tap(model, names(model, inputs))`` returns every one of them, in that order, equal to the truth;
* the model is unchanged: parameters, buffers, modules, modes, hooks, and the RNG state.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from support.strategies import Case, case_truth, cases, seed_rng
from support.truth import assert_same, assert_unchanged, model_fingerprint

import fxtap

# each example runs the model several times (truth, names, a tap of every name, a tap per name
# left out): a quarter of the profile's examples (ci: 50, thorough: 1,250) keeps the default suite short
EXAMPLES = max(1, settings().max_examples // 4)


def _tap(model: Any, names: list[str]) -> fxtap.Tapped:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
        return fxtap.tap(model, names)


def _inputs(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The call as one batch (``fxtap.extract``'s convention): positional, or all by keyword."""
    if not kwargs:
        return args
    positional = list(inspect.signature(model.forward).parameters)
    return {**dict(zip(positional, args)), **kwargs}


def _module_calls(model: torch.nn.Module, names: list[str]) -> set[str]:
    paths = {path for path, _ in model.named_modules() if path}
    return {n for n in names if n in paths or n.rpartition("_")[0] in paths and n.rpartition("_")[2].isdigit()}


@settings(max_examples=EXAMPLES)
@given(case=cases(untraceable=True))
def test_property_names_with_inputs_are_what_the_call_produces(case: Case) -> None:
    model, args, kwargs = case.build()
    truth = case_truth(copy.deepcopy(model), args, kwargs, seed=0)
    before = model_fingerprint(model)

    seed_rng(0)  # what a call does may depend on its random draws (a dropout before a branch on a value)
    rng = torch.get_rng_state()
    produced = fxtap.names(model, _inputs(model, args, kwargs), train=case.train)
    assert_unchanged(before, model)
    assert torch.equal(torch.get_rng_state(), rng)  # as seeded: names() draws from a fork
    assert len(set(produced)) == len(produced)
    assert _module_calls(model, produced) == set(truth.modules)
    assert set(truth.ops) <= set(produced), sorted(set(truth.ops) - set(produced))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
        static = fxtap.names(model, train=case.train)
    for name in [n for n in static if n not in produced]:  # listed, and no call of this input makes it
        seed_rng(0)
        with pytest.raises((fxtap.MissingCallError, fxtap.TapNameError)):  # TapNameError: not in this call's graph
            _tap(model, [name])(*args, **kwargs)

    seed_rng(0)
    out = _tap(model, produced)(*args, **kwargs)
    assert list(out) == produced
    known = [n for n in produced if n in truth.values]
    assert_same({n: out[n] for n in known}, {n: truth.values[n] for n in known})
