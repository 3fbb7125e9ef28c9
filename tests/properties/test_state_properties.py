"""Property: on random models with state, FX == hooks == truth, call after call.

The models come from ``strategies.cases(stateful=True)``: besides every block of the other
properties, ``Stateful`` blocks keep buffers that forward writes in place and reads later (an
EMA updated in training only, a tensor counter, the previous call's value, a MoCo-style queue
and its pointer). Three copies of one model run side by side from the same RNG seed: the truth
(eager, values cloned when produced), ``mode="auto"`` (FX wherever the code traces) and
``mode="hooks"`` (module calls only). After each of three calls, the requested values and the
model's own output agree exactly, and so does every buffer of the three copies.
"""

from __future__ import annotations

import copy
import warnings

from hypothesis import assume, given, settings
from hypothesis import strategies as st

import fxtap
from support.strategies import Case, case_truth, cases, seed_rng
from support.truth import assert_same

CALLS = 3
# each example runs three copies of a model three times: half the profile's examples (ci: 100,
# thorough: 2,500) keep its time near that of the other properties
EXAMPLES = max(1, settings().max_examples // 2)


def _tap(model: object, names: list[str], **options: object) -> fxtap.Tapped:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
        return fxtap.tap(model, names, **options)  # type: ignore[arg-type]


@settings(max_examples=EXAMPLES)
@given(case=cases(untraceable=True, stateful=True), data=st.data())
def test_property_values_and_buffers_agree_over_three_calls(case: Case, data: st.DataObject) -> None:
    model, args, kwargs = case.build()
    truth_model, hooks_model = copy.deepcopy(model), copy.deepcopy(model)
    truths, buffers = [], []  # eager truth of each call, and the buffers after it
    for call in range(CALLS):
        truths.append(case_truth(truth_model, args, kwargs, seed=call))
        buffers.append({name: b.clone() for name, b in truth_model.named_buffers()})
    # a module behind a branch on a value runs in one call and not in the next once state moves
    # the value (a Gate after an EMA): eagerly it is not called, and fxtap says so with a
    # MissingCallError (test_regressions). Ask for what every call produces.
    names = [name for name in truths[0].names if all(name in truth.values for truth in truths)]
    assume(names)
    count = data.draw(st.integers(1, min(4, len(names))), label="number of names")
    chosen = data.draw(st.permutations(names), label="names")[:count]
    keep_output = data.draw(st.booleans(), label="keep_output")
    by_auto = _tap(model, chosen, keep_output=keep_output)
    modules = [name for name in chosen if name in truths[0].modules]
    by_hooks = _tap(hooks_model, modules, mode="hooks", keep_output=keep_output) if modules else None
    for call, truth in enumerate(truths):
        seed_rng(call)
        out = by_auto(*args, **kwargs)
        assert_same({n: out[n] for n in chosen}, {n: truth.values[n] for n in chosen})
        if keep_output:
            assert_same(out["output"], truth.values["output"])
        assert_same(dict(model.named_buffers()), buffers[call])
        if by_hooks is not None:
            seed_rng(call)
            hooked = by_hooks(*args, **kwargs)
            assert_same({n: hooked[n] for n in modules}, {n: truth.values[n] for n in modules})
            assert_same(dict(hooks_model.named_buffers()), buffers[call])
