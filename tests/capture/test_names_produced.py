"""``fxtap.names(model, example_inputs)``: exactly the names that one call produces (issue 17).

Without inputs, ``names`` reads the code: under eagerly run code it lists every submodule, and
some are never called. With inputs it runs the model once and lists what that call produced,
so that ``tap(model, names(model, x))(x)`` works; the model is left exactly as it was.
Truth: plain forward hooks (``support.truth.hook_truth``), never fxtap.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from support.truth import (
    assert_same,
    assert_unchanged,
    hook_truth,
    model_fingerprint,
    quiet_fallbacks,
)
from torch import nn

import fxtap


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + x  # fc, add


class Skips(nn.Module):
    """An eager root (a branch on a value) that calls ``blk`` twice and never calls ``unused``;
    ``drop`` runs in train mode only, ``bn`` updates its statistics in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.blk = Block()
        self.unused = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor, fail: bool = False) -> torch.Tensor:
        if fail:
            raise ValueError("this input is refused")
        if x.sum() > 1e9:  # never true: FX cannot trace a branch on a value
            x = self.unused(x)
        x = self.bn(self.blk(self.blk(x)))
        if self.training:
            x = self.drop(x)
        return x


def _skips() -> Skips:
    torch.manual_seed(0)
    return Skips().eval()


def _tap(model: nn.Module, names: list[str], **options: object) -> fxtap.Tapped:
    with quiet_fallbacks():
        return fxtap.tap(model, names, **options)  # type: ignore[arg-type]


def test_names_with_inputs_lists_what_the_call_produces() -> None:
    model, x = _skips(), torch.randn(3, 4)
    with quiet_fallbacks():
        static = fxtap.names(model)
        produced = fxtap.names(model, x)
    assert "unused" in static and "drop" in static  # listed from the code, never called in eval mode
    assert _without_root_ops(model, produced) == ["blk.fc", "blk.fc_1", "blk.add", "blk.add_1", "blk", "blk_1", "bn"]
    out = _tap(model, produced)(x)
    truth = hook_truth(model, x)
    assert list(out) == produced
    assert_same({n: out[n] for n in ["blk", "blk_1", "bn"]}, {n: truth[n] for n in ["blk", "blk_1", "bn"]})
    assert_same(out["blk.add_1"], truth["blk_1"])  # the second call's add is that call's output
    assert_same(out["blk.fc_1"], model.blk.fc(truth["blk"]))


def test_names_without_inputs_may_list_names_no_call_produces() -> None:
    model, x = _skips(), torch.randn(3, 4)
    with pytest.raises(fxtap.MissingCallError, match=r"fxtap\.names\(model, example_inputs\) lists exactly the names"):
        _tap(model, fxtap.names(model))(x)


class Offers(Skips):
    """``Skips`` offering example inputs the Hugging Face way: ``dummy_inputs``, a dict of
    keyword arguments, one of which (``decoder_ids``) its forward does not take, as transformers'
    ``T5EncoderModel`` offers decoder inputs. ``dummy_inputs`` reads the RNG, as a sampled
    example would."""

    width = 4

    @property
    def dummy_inputs(self) -> dict[str, torch.Tensor]:
        return {"x": torch.randn(3, self.width), "decoder_ids": torch.zeros(3, 2, dtype=torch.long)}


def test_names_without_inputs_calls_the_model_on_its_dummy_inputs() -> None:
    """The offered example tells which modules the eager root calls: ``unused`` and (in eval
    mode) ``drop`` are left out, so tap(model, names(model)) works; ``bn``'s statistics, the
    RNG state and the model are as before; ops are still read from the code."""
    torch.manual_seed(0)
    model, x = Offers().eval(), torch.randn(3, 4)
    before = model_fingerprint(model)
    rng = torch.get_rng_state()
    with quiet_fallbacks():
        listed = fxtap.names(model)
        in_train = fxtap.names(model, train=True)
    assert torch.equal(torch.get_rng_state(), rng)
    assert_unchanged(before, model)
    assert "unused" not in listed and "drop" not in listed and {"blk", "bn"} <= set(listed)
    assert "drop" in in_train and "unused" not in in_train  # train mode calls the dropout
    out = _tap(model, listed)(x)
    truth = hook_truth(model, x)
    assert_same({n: out[n] for n in ["blk", "bn"]}, {n: truth[n] for n in ["blk", "bn"]})
    model.train()
    torch.manual_seed(1)
    train_out = _tap(model, in_train)(x)
    assert set(train_out) == set(in_train)


def test_names_without_inputs_does_not_run_dummy_ids_outside_the_vocabulary(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' dummy ids go up to 7: with a smaller vocabulary the call would index out of
    range, which on a GPU is a device-side assert that breaks the CUDA context. names() does not
    make that call, and lists every module."""
    from transformers import GPT2Config, GPT2Model

    model = GPT2Model(GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=5, eos_token_id=0, bos_token_id=0)).eval()
    assert int(model.dummy_inputs["input_ids"].max()) >= 5
    import fxtap._capture as engine

    calls: list[object] = []
    monkeypatch.setattr(engine, "produced", lambda *args, **kwargs: calls.append(args) or [])
    with quiet_fallbacks():
        listed = fxtap.names(model)
    assert calls == []  # no call on the dummy inputs
    assert "h.0.attn.attn_dropout" in listed  # not called by fused attention: listed, since no call was made


def test_names_without_inputs_lists_every_module_when_the_dummy_inputs_do_not_fit() -> None:
    torch.manual_seed(0)
    model = Offers().eval()
    model.width = 5  # the linear layers refuse it: the call fails
    with quiet_fallbacks():
        listed = fxtap.names(model)
    assert {"unused", "drop", "blk", "bn"} <= set(listed)
    assert listed == fxtap.names(_skips())


class _Encoder(nn.Module):
    def __init__(self, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens  # the root's ``shared``, as in T5
        self.fc = nn.Linear(4, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed_tokens(ids))


class SharedEmbedding(nn.Module):
    """T5's layout: one embedding reached as ``shared`` and as ``encoder.embed_tokens``; the
    eager root (a branch on a value) calls it only through the encoder, which FX traces."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Embedding(10, 4)
        self.encoder = _Encoder(self.shared)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.encoder(ids)
        return out * 2 if out.sum() > 1e9 else out


def test_names_without_inputs_of_a_module_reached_under_two_paths_are_both_produced() -> None:
    torch.manual_seed(0)
    model, ids = SharedEmbedding().eval(), torch.tensor([[1, 2, 3]])
    with quiet_fallbacks():
        static = fxtap.names(model)
    assert {"encoder.embed_tokens", "shared"} <= set(static)
    out = _tap(model, static)(ids)
    assert_same(out["encoder.embed_tokens"], model.shared(ids))
    assert_same(out["shared"], model.shared(ids))  # one module: its call answers to either path
    assert_same(out["encoder"], hook_truth(model, ids)["encoder"])


class _FusedAttention(nn.Module):
    """Attention as transformers writes it: ``drop`` gives its ``p`` to the fused kernel and is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.drop.p if self.training else 0.0)


class EagerAroundFused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = _FusedAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.attn(x)
        return out * 2 if out.sum() > 1e9 else out  # FX cannot trace a branch on a value


def test_names_without_inputs_leaves_out_a_module_the_graph_of_a_traced_child_never_calls() -> None:
    torch.manual_seed(0)
    model, x = EagerAroundFused().eval(), torch.randn(2, 3, 4)
    with quiet_fallbacks():
        static = fxtap.names(model)
    assert "attn.drop" not in static and {"attn.qkv", "attn"} <= set(static)
    out = _tap(model, static)(x)
    assert_same(out["attn"], hook_truth(model, x)["attn"])
    assert_same(out["attn.qkv"], model.attn.qkv(x))


def test_names_with_inputs_follows_train() -> None:
    model, x = _skips(), torch.randn(3, 4)
    eval_names = fxtap.names(model, x)
    train_names = fxtap.names(model, x, train=True)
    assert "drop" not in eval_names and "drop" in train_names
    assert [n for n in train_names if n != "drop"] == eval_names
    assert not model.training
    model.train()
    torch.manual_seed(1)
    out = _tap(model, train_names)(x)
    torch.manual_seed(1)
    truth = hook_truth(model, x)
    assert list(out) == train_names
    assert_same(out["drop"], truth["drop"])


def test_names_with_inputs_leaves_the_model_as_it_was() -> None:
    model, x = _skips(), torch.randn(3, 4)
    model.train()
    model.blk.eval()  # a mode per module, kept as it is
    before = model_fingerprint(model)
    rng = torch.get_rng_state()
    names = fxtap.names(model, x, train=True)
    assert "drop" in names
    assert_unchanged(before, model)  # BatchNorm's running statistics too
    assert torch.equal(torch.get_rng_state(), rng)  # the dropout drew from a forked RNG
    assert "forward" not in model.blk.__dict__  # no router left on the traced child


def test_names_with_inputs_leaves_the_model_as_it_was_when_forward_raises() -> None:
    model, x = _skips(), torch.randn(3, 4)
    model.train()
    before = model_fingerprint(model)
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match="this input is refused"):
        fxtap.names(model, {"x": x, "fail": True}, train=True)
    assert_unchanged(before, model)
    assert torch.equal(torch.get_rng_state(), rng)
    assert "forward" not in model.blk.__dict__


@pytest.mark.parametrize("form", ["tensor", "tuple", "list", "dict"])
def test_names_with_inputs_takes_a_batch_as_extract_does(form: str) -> None:
    model, x = _skips(), torch.randn(3, 4)
    inputs = {"tensor": x, "tuple": (x,), "list": [x], "dict": {"x": x}}[form]
    assert fxtap.names(model, inputs) == fxtap.names(model, (x, False))


class Attention(nn.Module):
    """Traced root: ``nn.MultiheadAttention`` is one step and never calls its ``out_proj``."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.attn(x, x, x, need_weights=False)[0])


def test_names_with_inputs_leaves_out_a_module_of_a_torch_nn_leaf_never_called() -> None:
    model, x = Attention().eval(), torch.randn(2, 3, 4)
    static = fxtap.names(model)
    produced = fxtap.names(model, x)
    assert "attn.out_proj" not in static and "attn.out_proj" not in produced  # read from torch.nn's code, and seen
    assert produced == static
    out = _tap(model, produced)(x)
    assert list(out) == produced
    assert_same(out["fc"], model(x))


class Twice(nn.Module):
    """Eager root whose untraceable child ``loop`` calls ``f`` (a ``torch.nn`` leaf, hooked) twice."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = Loop()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.loop(x)) if x.sum() > -1e9 else x


class Loop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(int(x.shape[0]) - 1):  # int() of a size: untraceable
            x = self.f(x)
        return x


def test_names_with_inputs_lists_later_calls_of_hooked_modules() -> None:
    model, x = Twice().eval(), torch.randn(3, 4)
    produced = fxtap.names(model, x)
    assert _without_root_ops(model, produced) == ["loop", "loop.f", "loop.f_1"]  # hooked names in names(model)'s order, later calls after
    out = _tap(model, produced)(x)
    truth = hook_truth(model, x)
    modules = [n for n in produced if n in truth]
    assert modules == ["loop", "loop.f", "loop.f_1"]
    assert_same({n: out[n] for n in modules}, {n: truth[n] for n in modules})
    assert _without_root_ops(model, fxtap.names(model, torch.randn(2, 4))) == ["loop", "loop.f"]  # another call, other names


def test_names_with_inputs_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        fxtap.names(_skips(), torch.randn(3, 4), mode="graph")  # type: ignore[arg-type]


class Pairwise(nn.Module):
    """Called with a list: its default call (one tensor) traces to another graph, whose
    ``getitem`` nodes the list call does not have (timm's crossvit blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return self.fc(xs[0]) + xs[1]


class ListCaller(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pair = Pairwise()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pair([x, x * 2]) if x.sum() > -1e9 else x


def test_names_with_inputs_keeps_the_names_of_a_child_called_with_other_arguments() -> None:
    model, x = ListCaller().eval(), torch.randn(3, 4)
    with quiet_fallbacks():
        static = fxtap.names(model)
    produced = fxtap.names(model, x)
    assert "pair.getitem" in static and "pair.getitem" not in produced  # a node of the default call's graph only
    assert _without_root_ops(model, produced) == ["pair.fc", "pair.add", "pair"]
    out = _tap(model, produced)(x)
    assert_same(out["pair.add"], model(x))
    assert_same(out["pair.fc"], model.pair.fc(x))
    for name in [n for n in static if n not in produced]:  # tapped alone, no call of x makes it either
        with pytest.raises(fxtap.MissingCallError):
            _tap(model, [name])(x)


def test_names_with_inputs_in_hooks_mode_lists_every_module_call() -> None:
    model, x = _skips(), torch.randn(3, 4)
    produced = fxtap.names(model, x, mode="hooks")
    assert produced == ["blk", "blk_1", "blk.fc", "blk.fc_1", "bn"]
    out = _tap(model, produced, mode="hooks")(x)
    truth = hook_truth(model, x)
    assert_same(dict(out), {n: truth[n] for n in produced})


def test_names_with_inputs_include_the_own_ops_of_an_eager_root() -> None:
    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 1e9:  # FX cannot trace this root
                x = x * 0
            return torch.relu(self.fc(x) + 1)

    torch.manual_seed(0)
    model, x = Root().eval(), torch.randn(2, 4)
    listed = fxtap.names(model, x)
    assert "add" in listed and "relu" in listed and "add" not in fxtap.names(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
        out = fxtap.tap(model, listed)(x)
    with torch.no_grad():
        expected_add = model.fc(x) + 1
    torch.testing.assert_close(out["add"], expected_add, rtol=0, atol=0)
    torch.testing.assert_close(out["relu"], torch.relu(expected_add), rtol=0, atol=0)


def _without_root_ops(model: nn.Module, names: list[str]) -> list[str]:
    """The names that are not the own ops of the eagerly running root (``sum``, ``gt`` of its
    ``if x.sum() > 0``: eager_ops names them, tests/capture/test_eager_ops.py checks them)."""
    paths = dict(model.named_modules())
    return [n for n in names if "." in n or n.rsplit("_", 1)[0] in paths or n in paths]


def test_names_without_inputs_leave_out_the_out_proj_multihead_attention_never_calls() -> None:
    """nn.MultiheadAttention reads out_proj's weight and never calls it (torchvision's ViT):
    names(model) does not list it, so tap(model, names(model)) returns every name."""

    class Attends(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.mha(x, x, x)[0])

    torch.manual_seed(0)
    model, x = Attends().eval(), torch.randn(2, 3, 8)
    listed = fxtap.names(model)
    assert "mha" in listed and "mha.out_proj" not in listed
    out = _tap(model, listed)(x)
    assert list(out) == listed
    assert_same(out["mha"], hook_truth(model, x)["mha"])
