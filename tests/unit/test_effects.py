"""Unit tests of the pruning pass and of the op facts it reads from schemas (``effects``).

Each builds a tiny model, traces it with fxtap's tracer and asks about named nodes; the
expectations come from the operator's documented semantics, not from the code under test.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxtap._capture import effects
from fxtap._capture import fx as _fx
from fxtap._capture.prune import may_change_state, plan


@torch.library.custom_op("fxtap_unit::scale_", mutates_args=("t",))
def _scale_(t: torch.Tensor, by: float) -> None:
    t.mul_(by)


class Ops(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("buf", torch.zeros(4))
        self.register_buffer("rm", torch.zeros(4))
        self.register_buffer("rv", torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x * 2
        a.add_(1)  # add_
        torch.ops.aten.relu_.default(a)  # relu_.default
        _scale_(a, 2.0)  # scale_.default
        b = x * 3  # mul_1
        torch.add(x, x, out=b)  # add (b stays the node mul_1)
        self.buf.index_copy_(0, torch.tensor([0]), a[0, :1])  # index_copy_
        c = F.relu(b, inplace=True)  # relu
        d = b.view(-1)  # view
        e = b.reshape(2, -1)  # reshape
        f = b.to(torch.float32)  # to
        g = torch.relu(b)  # relu_1
        b += 1  # add_1 (operator.iadd)
        h = F.batch_norm(x, self.rm, self.rv, training=True)  # batch_norm
        i = F.batch_norm(x, self.rm, self.rv, training=False)  # batch_norm_1
        j = F.dropout(x, 0.5, True) + F.dropout(x, 0.5, False)  # dropout, dropout_1, add_2
        k = F.scaled_dot_product_attention(x[None], x[None], x[None])  # getitem.. sdpa
        k2 = F.scaled_dot_product_attention(x[None], x[None], x[None], dropout_p=0.5)  # sdpa_1
        n = torch.rand(3)  # rand (no tensor argument)
        o = torch.empty_like(x).normal_()  # empty_like, normal_
        p = F.rrelu(x) + F.rrelu(x, training=True)  # rrelu, rrelu_1
        q = F.fractional_max_pool2d(x[None, None], 2, output_size=(1, 1))  # fractional_max_pool2d
        return (a, c, d, e, f, g, h, i, j, k, k2, n, o, p, q)


@pytest.fixture(scope="module")
def nodes() -> dict[str, fx.Node]:
    traced = _fx.trace(Ops())
    return {node.name: node for node in traced.graph.nodes}


def _names(found: list[fx.Node]) -> list[str]:
    return [n.name for n in found]


@pytest.mark.parametrize(
    ("op", "written"),
    [
        ("add_", ["mul"]),  # Tensor(a!) self
        ("relu__default", ["mul"]),  # an OpOverload used directly
        ("scale__default", ["mul"]),  # torch.library.custom_op(mutates_args=("t",))
        ("add", ["mul_1"]),  # out=
        ("index_copy_", ["buf"]),
        ("relu", ["mul_1"]),  # F.relu(inplace=True): a Python function, by its parameter
        ("iadd", ["mul_1"]),  # x += 1
        ("batch_norm", ["rm", "rv"]),  # running statistics in training (the schema omits them)
        ("batch_norm_1", []),
        ("relu_1", []),
        ("view", []),
    ],
)
def test_effects_written_arguments(nodes: dict[str, fx.Node], op: str, written: list[str]) -> None:
    assert sorted(_names(effects.written(nodes[op]))) == sorted(written)


@pytest.mark.parametrize(("op", "aliased"), [("view", ["mul_1"]), ("reshape", ["mul_1"]), ("to", ["mul_1"]), ("relu_1", []), ("add_", ["mul"])])
def test_effects_aliased_arguments(nodes: dict[str, fx.Node], op: str, aliased: list[str]) -> None:
    assert _names(effects.aliased(nodes[op])) == aliased


@pytest.mark.parametrize(
    "op",
    [torch.ops.aten.split.Tensor, torch.ops.aten.split_with_sizes.default, torch.ops.aten.unbind.int, torch.ops.aten.tensor_split.sections],
)
def test_effects_list_of_views_aliases_its_input(op: torch._ops.OpOverload) -> None:
    """An export graph calls these aten overloads; their schema puts the alias set on the list's
    elements (``Tensor(a)[]``), so the result's own alias info is empty: a write into one piece
    (``y.split(2)[0].add_(1)``) writes into ``y``."""
    graph = fx.Graph()
    y = graph.placeholder("y")
    arg = {torch.ops.aten.split_with_sizes.default: [1, 1], torch.ops.aten.unbind.int: 0}.get(op, 2)
    pieces = graph.call_function(op, (y, arg))
    assert effects.aliased(pieces) == [y]


@pytest.mark.parametrize(
    ("op", "draws"),
    [
        ("dropout", True),
        ("dropout_1", False),  # training=False
        ("scaled_dot_product_attention", False),  # dropout_p=0.0 by default
        ("scaled_dot_product_attention_1", True),
        ("rand", True),  # recorded although no argument is a proxy
        ("normal_", True),
        ("rrelu", False),  # training=False by default
        ("rrelu_1", True),
        ("fractional_max_pool2d", True),  # a Python function: by name
        ("add_", False),
        ("relu", False),
    ],
)
def test_effects_draws_random(nodes: dict[str, fx.Node], op: str, draws: bool) -> None:
    assert effects.draws_random(nodes[op]) is draws


def test_effects_iadd_is_an_inplace_operator(nodes: dict[str, fx.Node]) -> None:
    assert nodes["iadd"].target is operator.iadd


def test_tracing_draws_nothing_from_the_rng() -> None:
    state = torch.get_rng_state()
    _fx.trace(Ops())
    assert torch.equal(torch.get_rng_state(), state)


# -- the plan --------------------------------------------------------------------------------------------
class Tail(nn.Module):
    """``first`` is requested; everything after it is needed only for its effects (or not at all)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.register_buffer("seen", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        unused = h * 2  # mul: no effect
        self.seen.add_(h.detach().sum(0))  # add_: a buffer write
        noise = F.dropout(h, 0.5, self.training)  # dropout: draws in training only
        return self.bn(h) + noise + unused


def _kept(train: bool) -> set[str]:
    model = Tail().train(train)
    traced = _fx.trace(model)
    graph = traced.graph
    first = next(n for n in graph.nodes if n.name == "first")
    decided = plan(graph, traced.root, [(first, first)], [])
    return {n.name for n in decided.kept}


def test_plan_keeps_buffer_writes_and_drops_dead_code() -> None:
    kept = _kept(False)
    assert {"add_", "seen", "sum_1", "detach"} <= kept
    assert not kept & {"mul", "dropout", "bn", "add", "add_1"}


def test_plan_keeps_random_draws_and_statistics_updates_in_training() -> None:
    kept = _kept(True)
    assert {"add_", "dropout", "bn"} <= kept
    assert "mul" not in kept


def test_plan_copies_a_buffer_read_that_a_later_call_overwrites() -> None:
    model = Tail().eval()
    traced = _fx.trace(model)
    seen = next(n for n in traced.graph.nodes if n.name == "seen")
    decided = plan(traced.graph, traced.root, [(seen, seen)], [])
    assert (seen, seen) in decided.copies


@pytest.mark.parametrize(
    ("module", "train", "changes"),
    [
        (nn.BatchNorm1d(4), True, True),
        (nn.BatchNorm1d(4), False, False),
        (nn.Dropout(0.5), True, True),
        (nn.Dropout(0.0), True, False),
        (nn.Linear(4, 4), True, False),
        (Tail(), False, True),  # code fxtap cannot see, with a buffer of its own
        (nn.Sequential(nn.Linear(4, 4)), True, False),
        (Ops(), False, True),
    ],
)
def test_may_change_state(module: nn.Module, train: bool, changes: bool) -> None:
    assert may_change_state(module.train(train)) is changes
