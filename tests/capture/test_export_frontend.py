"""The torch.export frontend (issue 17, docs/fallback.md "One graph with torch.export").

A model whose own forward FX cannot trace runs in mixed mode on the first call of each input
signature, which is then exported (non-strict) and served by one graph. Checked here against
eager truth (hook clones, the model's own computation) and against the other frontends: every
name means the same value under FX, mixed mode and export.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from support import matrix, toy_models
from support.registry import CASES
from support.toy_models import ExportRoot
from support.truth import (
    assert_same,
    assert_unchanged,
    hook_truth,
    model_fingerprint,
    quiet_fallbacks,
)
from torch import nn

import fxtap
from fxtap._capture import describe


def _tap(model: nn.Module, names: list[str], **kwargs: object) -> fxtap.Tapped:
    with quiet_fallbacks():
        return fxtap.tap(model, names, **kwargs)


def _attributes(model: nn.Module) -> dict[str, dict[str, int]]:
    return {path: {k: id(v) for k, v in vars(m).items()} for path, m in model.named_modules()}


# -- names mean the same values under FX and under export ------------------------------------------------

_FX_MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(weights=None, num_classes=10).eval(), lambda: (torch.randn(2, 3, 32, 32),)),
    "inplace_zoo": (toy_models.InplaceZoo, lambda: (torch.randn(3, 4),)),
    "alias_update": (toy_models.AliasUpdate, lambda: (torch.randn(2, 3), torch.randn(2, 3))),
    "pos_add": (toy_models.PosAdd, lambda: (torch.randn(2, 3),)),
    "shared": (toy_models.Shared, lambda: (torch.randn(2, 4),)),
}


@pytest.mark.parametrize("which", list(_FX_MODELS))
def test_export_names_mean_what_fx_names_mean(which: str) -> None:
    build, inputs = _FX_MODELS[which]
    torch.manual_seed(0)
    inner = build()
    args = inputs()
    infos = [i for i in describe(inner) if i.kind in ("module", "op") and i.path == "fx"]
    fx_values = fxtap.tap(inner, [i.name for i in infos], mode="fx")(*args)
    root = ExportRoot(inner)
    wanted = {f"inner.{i.name}": i.name for i in infos} | {"inner": "output"}
    tapped = _tap(root, list(wanted))
    tapped(*args)  # mixed mode, then the export
    exported = tapped(*args)
    assert tapped.mode == "export", tapped.report()
    assert set(tapped.paths.values()) == {"export"}
    for name, fx_name in wanted.items():
        expected = inner(*args) if fx_name == "output" else fx_values[fx_name]
        assert_same(exported[name], expected)


def test_export_copies_a_value_the_root_overwrites_in_place() -> None:
    class Bump(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc(x)
            if x.shape[0] > 0:
                y += 1  # the root writes into fc's output after fc returned it
            return y

    model = Bump()
    tapped = _tap(model, ["fc"])
    x = torch.randn(2, 3)
    tapped(x)
    out = tapped(x)
    assert tapped.mode == "export"
    assert_same(out["fc"], model.fc(x))


def _clones(tapped: fxtap.Tapped) -> int:
    served = tapped._last_runner().last  # the graph the call ran (graph_module() exports the call again)
    assert served is not None and served.module is not None
    return sum(n.target is torch.ops.aten.clone.default for n in served.module.graph.nodes)


def test_export_graph_keeps_only_the_copies_a_later_write_needs() -> None:
    """Hooks and region graphs copy what they capture; the exported graph sees what runs later
    and drops the copies of values nothing writes into (``prune.drop_copies``)."""

    class Block(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(x) * 2

    class Root(nn.Module):
        def __init__(self, overwrite: bool) -> None:
            super().__init__()
            self.fc, self.block, self.overwrite = nn.Linear(3, 3), Block(), overwrite

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.block(self.fc(x))
            if x.shape[0] > 0 and self.overwrite:
                y += 1  # written after block returned it: its copy must stay
            return y

    x = torch.randn(2, 3)
    for overwrite, copies in ((False, 0), (True, 1)):
        model = Root(overwrite)
        tapped = _tap(model, ["fc", "block"])
        tapped(x)
        out = tapped(x)
        assert tapped.mode == "export"
        assert _clones(tapped) == copies
        assert_same(out, {"fc": model.fc(x), "block": model.block(model.fc(x))})


def _rows_sub_(y: torch.Tensor) -> None:
    for row in y:  # aten.unbind
        row.sub_(2)


# writes into ``y`` through ops whose aten schema marks no alias but whose code returns ``y`` or a view of it
_WRITES_THROUGH = {
    "split": lambda y: y.split(2, dim=1)[0].add_(1),  # the list's elements carry the alias set
    "unbind": lambda y: y.unbind(0)[1].mul_(3),
    "rows": _rows_sub_,
    "type_as": lambda y: y.type_as(y).add_(1),  # returns y itself (same dtype)
    "atleast_2d": lambda y: torch.atleast_2d(y).add_(1),
    "broadcast_tensors": lambda y: torch.broadcast_tensors(y, y)[0].add_(1),
    "dropout2d_eval": lambda y: nn.functional.dropout2d(y[..., None, None], 0.5, training=False).add_(1),  # aten.feature_dropout
    "dropout_p0": lambda y: nn.functional.dropout(y, 0.0, training=True).add_(1),  # returns y itself
    "einsum": lambda y: torch.einsum("ij->ji", y).add_(1),  # a permuted view
    "sum_to_size": lambda y: y.sum_to_size(y.shape).add_(1),  # y itself
    "unsafe_chunk": lambda y: y.unsafe_chunk(2, 1)[0].add_(1),  # views, though its schema says none
}


@pytest.mark.parametrize("how", list(_WRITES_THROUGH))
def test_export_graph_keeps_the_copy_of_a_value_written_through_an_alias(how: str) -> None:
    """The root writes into ``fc``'s value after the hook copied it, through a piece of a split,
    a loop over rows, ``type_as``, ``atleast_2d``, ``broadcast_tensors`` or a dropout that returns
    its input: aten's schemas of these mark no alias (the graph's fake values do). The graph
    returned the written value itself."""

    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc(x)
            if x.shape[0] > 0:  # FX cannot trace the root
                _WRITES_THROUGH[how](y)
            return y * 1

    torch.manual_seed(0)
    model = Root().eval()
    x = torch.randn(3, 4)
    tapped = _tap(model, ["fc"])
    with torch.no_grad():
        tapped(x)
        out = tapped(x)
        truth = hook_truth(model, x)
    assert tapped.mode == "export", tapped.report()
    assert_same(out["fc"], truth["fc"])


# -- Hugging Face models: one graph, values equal to eager ------------------------------------------------

_HF = ["transformers/BertModel", "transformers/GPT2Model"]
_HF_SLOW = ["transformers/LlamaModel", "transformers/ViTModel", "transformers/CLIPVisionModel", "transformers/T5EncoderModel", "transformers/WhisperEncoder"]


@pytest.mark.parametrize(
    "name", [*_HF, *(pytest.param(n, marks=pytest.mark.slow) for n in _HF_SLOW)]
)
def test_export_hf_values_equal_eager_and_mixed(name: str) -> None:
    case = CASES[name]
    model = case.build().eval()
    args, kwargs = case.inputs()
    if name == "transformers/GPT2Model":
        kwargs = {**kwargs, "use_cache": False}  # assert_same does not open a DynamicCache: see the cache tests below
    truth = hook_truth(model, *args, **kwargs)
    module_paths = {p for p, _ in model.named_modules()}
    with quiet_fallbacks():
        ops = [n for n in fxtap.names(model) if n not in module_paths]
    wanted = list(dict.fromkeys([n for n in truth if n != "output"] + ops))  # every module call (later ones too) and every op
    before, attributes = model_fingerprint(model), _attributes(model)
    tapped = _tap(model, wanted, keep_output=True)
    mixed = tapped(*args, **kwargs)
    exported = tapped(*args, **kwargs)
    assert tapped.mode == "export", tapped.report()
    for key in wanted:
        assert_same(exported[key], mixed[key])  # the same name means the same value under both
        if key in truth:
            assert_same(exported[key], truth[key])
    assert_same(exported["output"], truth["output"])
    assert_unchanged(before, model)
    assert _attributes(model) == attributes  # torch.export's own attribute writes are undone too


# -- a cache in what the tapped call returns, and one passed in -------------------------------------------

_CACHED = ["transformers/GPT2Model+cache", "transformers/LlamaModel+cache", "transformers/MistralModel", "transformers/Qwen2Model"]


def _eager(model: nn.Module, *args: object, **kwargs: object) -> object:
    with torch.no_grad():
        return model(*args, **kwargs)


@pytest.mark.parametrize("name", [_CACHED[0], *(pytest.param(n, marks=pytest.mark.slow) for n in _CACHED[1:])])
def test_export_hf_returned_cache_is_a_new_usable_cache_equal_to_eager(name: str) -> None:
    from transformers import DynamicCache

    case = CASES[name]
    model = case.build()
    args, kwargs = case.inputs()
    truth = _eager(model, *args, **kwargs)
    before, attributes = model_fingerprint(model), _attributes(model)
    tapped = _tap(model, [n for n, _ in model.named_modules() if n.endswith(".1")][:1], keep_output=True)
    with torch.no_grad():
        first = tapped(*args, **kwargs)
        second = tapped(*args, **kwargs)  # from the graph
    assert tapped.mode == "export", tapped.report()
    caches = [first["output"].cache, second["output"].cache]
    for out in (first, second):
        matrix.assert_close(out["output"], truth, where=name)  # every layer's keys, values and attributes
    assert all(type(c) is DynamicCache for c in caches)
    # a new object each call, as eagerly: nothing of one call's cache is another's
    assert caches[0] is not caches[1] and caches[0].layers is not caches[1].layers
    for mine, other in zip(caches[0].layers, caches[1].layers, strict=True):
        assert mine is not other and mine.keys is not other.keys and mine.values is not other.values
    assert_unchanged(before, model)
    assert _attributes(model) == attributes
    # the returned cache is a real one: generation goes on from it as from eager's
    torch.manual_seed(5)
    token = torch.randint(0, 100, (args[0].shape[0], 1))
    go_on = _eager(model, token, cache=caches[1])
    matrix.assert_close(go_on, _eager(model, token, cache=truth.cache), where=f"{name}, one more token")
    assert caches[1].get_seq_length() == args[0].shape[1] + 1


def test_export_hf_cache_passed_in_runs_eagerly_and_says_why() -> None:
    case = CASES["transformers/GPT2Model+cache"]
    model = case.build()
    args, kwargs = case.inputs()
    tapped = _tap(model, ["h.1"], keep_output=True)
    with torch.no_grad():
        cache = tapped(*args, **kwargs)["output"].cache
    eager_cache = _eager(model, *args, **kwargs).cache
    token = torch.randint(0, 100, (args[0].shape[0], 1))
    with torch.no_grad():
        for _ in range(2):
            out = tapped(token, cache=cache)
            truth = hook_truth(model, token, cache=eager_cache)  # the same update, eagerly
    assert tapped.mode == "mixed"
    assert "an argument is a DynamicCache" in tapped.report()
    assert "updates in place" in tapped.report()  # why the cache cannot go into the graph
    assert_same(out["h.1"], truth["h.1"])
    matrix.assert_close(cache, eager_cache, where="the cache passed in, updated as eagerly (2 more tokens)")


@pytest.mark.slow
def test_export_hf_cache_graph_serves_other_lengths() -> None:
    case = CASES["transformers/MistralModel"]  # sliding-window layers: the cache keeps the last 3 tokens
    model = case.build()
    tapped = _tap(model, ["layers.0"], keep_output=True)
    for length in (8, 6, 12, 2):
        tokens = torch.randint(0, 100, (2, length))
        with torch.no_grad():
            tapped(tokens)
            out = tapped(tokens)
        assert tapped.mode == "export", (length, tapped.report())
        matrix.assert_close(out["output"], _eager(model, tokens), where=f"{length} tokens")


class _Pair:
    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.a, self.b, self.label = a, b, "pair"


class _Holder(nn.Module):
    """Returns objects that hold tensors: one made by the forward, twice; and one it holds."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.kept = _Pair(torch.zeros(1), torch.ones(1))

    def forward(self, x: torch.Tensor, keep: bool = False) -> tuple[object, ...]:
        y = self.fc(x)
        if keep:
            return (y, self.kept)
        pair = _Pair(y, {"double": [y * 2]})
        return (pair, [pair])


def test_export_rebuilds_objects_made_by_the_forward_and_refuses_held_ones() -> None:
    model = ExportRoot(_Holder())
    tapped = _tap(model, ["inner"], keep_output=True)
    x = torch.randn(2, 3)
    tapped(x)
    out = tapped(x)
    assert tapped.mode == "export", tapped.report()
    pair, [again] = out["inner"]
    assert type(pair) is _Pair and pair is again  # one object, as eagerly
    assert_same(pair.a, model.inner.fc(x))
    assert_same(pair.b, {"double": [model.inner.fc(x) * 2]})
    assert pair.label == "pair"
    assert tapped(x)["inner"][0] is not pair  # a new one each call
    held = _tap(model, ["inner"])
    held(x, True)
    out = held(x, True)
    assert out["inner"][1] is model.inner.kept  # the model's own object, as eagerly
    assert held.mode != "export"
    assert "a _Pair that the call did not make" in held.report()


def test_export_hf_train_mode_draws_what_eager_draws() -> None:
    model = CASES["transformers/BertModel"].build().train()
    args, kwargs = CASES["transformers/BertModel"].inputs()
    names = ["embeddings.dropout", "encoder.layer.0.attention.output.add", "encoder.layer.1.output.dropout"]
    tapped = _tap(model, names)
    tapped(*args, **kwargs)
    torch.manual_seed(3)
    truth = hook_truth(model, *args, **kwargs)
    after_eager = torch.get_rng_state()
    torch.manual_seed(3)
    out = tapped(*args, **kwargs)
    assert tapped.mode == "export"
    assert torch.equal(torch.get_rng_state(), after_eager)  # the same draws, in the same order
    for name in ["embeddings.dropout", "encoder.layer.1.output.dropout"]:
        assert_same(out[name], truth[name])
    assert not torch.equal(out["embeddings.dropout"], model.embeddings.LayerNorm(truth["embeddings.LayerNorm"]))


def test_export_updates_buffers_as_eager_does() -> None:
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model, twin = ExportRoot(inner).train(), ExportRoot(copy.deepcopy(inner)).train()
    tapped = _tap(model, ["inner.1", "inner.0"])
    for step in range(3):
        x = torch.randn(2, 3, 8, 8)
        out = tapped(x)
        truth = hook_truth(twin, x)
        assert_same(out["inner.1"], truth["inner.1"])
    assert tapped.mode == "export"
    for (name, mine), (_, theirs) in zip(model.named_buffers(), twin.named_buffers(), strict=True):
        assert_same(mine, theirs), name


# -- when export is not used, and what says so -----------------------------------------------------------


def test_export_refused_with_user_hooks() -> None:
    model = ExportRoot(toy_models.InplaceZoo())
    seen: list[torch.Tensor] = []
    handle = model.inner.fc2.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    try:
        tapped = _tap(model, ["inner.fc1"])
        x = torch.randn(2, 4)
        tapped(x)
        tapped(x)
        assert len(seen) == 2  # the user's hook ran at every call
        assert tapped.mode == "mixed"
        assert "torch.export not tried: forward hook registered on 'inner.fc2'" in tapped.report()
    finally:
        handle.remove()


def test_export_refused_when_forward_writes_attributes() -> None:
    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] > 0:
                self.calls += 1
            return self.fc(x)

    model = Counting()
    tapped = _tap(model, ["fc"])
    for _ in range(3):
        tapped(torch.randn(2, 2))
    assert model.calls == 3  # as eagerly: no graph swallowed the write
    assert tapped.mode == "hooks"  # fc is a torch.nn leaf: hooks capture it under the eager root
    assert "writes the attribute 'calls'" in tapped.report()


def test_export_failure_keeps_mixed_mode_and_says_why(capsys: pytest.CaptureFixture[str]) -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent: neither FX nor torch.export can hold it
                x = -x
            return self.fc(x)

    model = Branchy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tapped = fxtap.tap(model, ["fc"])
    assert "fxtap exports that call with torch.export" in str(caught[0].message)
    for x in (torch.ones(2, 4), -torch.ones(2, 4)):
        out = tapped(x)
        assert_same(out["fc"], model.fc(-x if x.sum() > 0 else x))
    assert tapped.mode == "hooks"
    assert tapped.paths == {"fc": "hook"}
    assert "torch.export failed" in tapped.report()
    # torch.export prints a failed try's partial graph and logs shape warnings to stderr: the
    # report above is where fxtap says it, once, and nothing else reaches the user's terminal
    assert capsys.readouterr().err == ""


# -- the graph follows the model --------------------------------------------------------------------------


def test_export_graph_rebuilt_for_new_shapes_and_swapped_modules() -> None:
    model = ExportRoot(toy_models.InplaceZoo())
    tapped = _tap(model, ["inner.fc2", "inner.add"])
    for batch in (2, 2, 5, 5):
        x = torch.randn(batch, 4)
        out = tapped(x)
        assert_same(out["inner.fc2"], hook_truth(model, x)["inner.fc2"])
    assert tapped.mode == "export"
    model.inner.fc2 = nn.Linear(4, 4)  # a swapped submodule: the guard sees it
    x = torch.randn(5, 4)
    assert_same(tapped(x)["inner.fc2"], hook_truth(model, x)["inner.fc2"])
    with torch.no_grad():
        model.inner.fc2.weight.mul_(2)  # an in-place update: the graph reads the model's own tensors
    assert_same(tapped(x)["inner.fc2"], hook_truth(model, x)["inner.fc2"])


def test_export_graph_rebuilt_when_the_model_changes_dtype_in_place() -> None:
    """``model.double()`` keeps every Parameter object (the guard sees no swap) and changes what
    the graph baked in (``torch.finfo(dtype)``, ``.to`` checks): the graph is exported again.
    The old graph gave float32's eps (toy) or raised a dtype mismatch (GPT-2)."""
    model = ExportRoot(toy_models.DtypeBaked())
    tapped = _tap(model, ["inner.fc", "inner"])
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    for _ in range(2):
        tapped(ids)
    assert tapped.mode == "export"
    model.double()
    for _ in range(2):
        out = tapped(ids)
        truth = hook_truth(model, ids)
        assert_same(out, {"inner.fc": truth["inner.fc"], "inner": truth["inner"]})
    assert tapped.mode == "export"

    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    gpt2 = GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, eos_token_id=0, bos_token_id=0)).eval()
    tapped = _tap(gpt2, ["h.0.mlp"])
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        tapped(ids)
        tapped(ids)
        gpt2.to(torch.bfloat16)
        for _ in range(2):
            assert_same(tapped(ids)["h.0.mlp"], hook_truth(gpt2, ids)["h.0.mlp"])


def test_export_hf_graph_skips_the_mask_eager_code_skips() -> None:
    """Without a padding mask, eager transformers passes no mask to SDPA (``is_causal=True`` for a
    decoder); the exported graph does the same (``masks.eager_shortcuts``) instead of building an
    all-ones mask, with equal values. A padding mask given is still applied. The old graph passed
    a mask to every attention call."""
    from transformers import GPT2Config, GPT2Model, masking_utils

    original = masking_utils.is_torchdynamo_exporting
    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, eos_token_id=0, bos_token_id=0)).eval()
    tapped = _tap(model, ["h.0", "h.1.attn"])
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0  # left padding in the first row
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            for _ in range(2):
                out = tapped(ids, **kwargs)
            assert tapped.mode == "export"
            truth = hook_truth(model, ids, **kwargs)
            assert_same(out, {"h.0": truth["h.0"], "h.1.attn": truth["h.1.attn"]})
            served = tapped._last_runner().last
            assert served is not None and served.module is not None
            attention = [n for n in served.module.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
            masks = [n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask") for n in attention]
            assert len(attention) == 2
            assert all(m is None for m in masks) if not kwargs else all(m is not None for m in masks)
    assert masking_utils.is_torchdynamo_exporting is original


def test_export_refused_when_forward_fills_a_cache() -> None:
    class Caching(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.seen: list[int] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] > 0:
                self.seen.append(x.shape[0])  # Python-side state, filled in place
            return self.fc(x)

    model = ExportRoot(Caching())
    tapped = _tap(model, ["inner.fc"])
    for _ in range(3):
        tapped(torch.randn(2, 2))
    assert model.inner.seen == [2, 2, 2]
    assert "writes the attribute 'inner.seen'" in tapped.report()


def test_export_graph_gradients_equal_eager() -> None:
    torch.manual_seed(0)
    model = ExportRoot(toy_models.InplaceZoo())
    twin = copy.deepcopy(model)
    tapped = _tap(model, ["inner.fc2", "inner.add"])
    x = torch.randn(3, 4)
    tapped(x)
    out = tapped(x)
    assert tapped.mode == "export"
    (out["inner.fc2"].sum() + out["inner.add"].pow(2).sum()).backward()
    a = torch.relu(twin.inner.fc1(x))  # the same computation by hand, out of place
    b = twin.inner.fc2(a)
    (b.sum() + (b + a).pow(2).sum()).backward()
    for (name, mine), (_, theirs) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        if theirs.grad is None:
            assert mine.grad is None or not mine.grad.any(), name
        else:
            torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("train", [False, True])
def test_export_first_call_backward_works_and_equals_eager(train: bool) -> None:
    # the first call runs eagerly, then a warm-up of the export's twin puts the batch norm
    # statistics it updated back: without moving their version counter, which the autograd graph
    # of the first call saved (found by test_property_gradients_agree_between_paths)
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 8))
    model, twin = ExportRoot(inner).train(train), ExportRoot(copy.deepcopy(inner)).train(train)
    tapped = _tap(model, ["inner.1", "inner.2"])
    x = torch.randn(5, 4)
    out = tapped(x)  # the first call: mixed mode, then the export
    (out["inner.1"].pow(2).sum() + out["inner.2"].sum()).backward()
    h = twin.inner[1](twin.inner[0](x))  # the same call, eagerly
    (h.pow(2).sum() + twin.inner[2](h).sum()).backward()
    for (name, mine), (_, theirs) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-6, msg=name)
    for (name, mine), (_, theirs) in zip(model.named_buffers(), twin.named_buffers(), strict=True):
        assert_same(mine, theirs), name


def test_export_graphs_per_input_kind_are_bounded() -> None:
    class SizeBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for k in range(10):
                if x.shape[0] == k:  # torch.export specializes the size: one graph per batch size
                    return self.fc(x) * k
            return self.fc(x)

    model = ExportRoot(SizeBranch())
    tapped = _tap(model, ["inner.fc", "inner"])
    for batch in (2, 3, 4, 5, 6, 7, 2, 6):
        x = torch.randn(batch, 2)
        for _ in range(2):
            out = tapped(x)
            assert_same(out["inner"], model.inner.fc(x) * batch)
        assert tapped.mode == ("export" if batch in (2, 3, 4, 5) else "hooks"), (batch, tapped.report())
    assert "4 graphs for other sizes of these inputs exist already" in tapped.report()


def test_export_train_and_eval_graphs_follow_the_mode() -> None:
    torch.manual_seed(0)
    model = ExportRoot(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 4)))
    tapped = _tap(model, ["inner.1", "inner.2"])
    x = torch.randn(3, 4)
    for training in (False, True, False, True):
        model.train(training)
        for _ in range(2):
            torch.manual_seed(7)
            out = tapped(x)
            torch.manual_seed(7)
            truth = hook_truth(model, x)
            assert_same(out["inner.1"], truth["inner.1"])
            assert_same(out["inner.2"], truth["inner.2"])
        assert tapped.mode == "export"
    assert not torch.equal(out["inner.1"], model.inner[0](x))  # train mode: dropout did drop
