"""Random ``nn.Module`` trees for the property tests, and the truth about each one.

A model is drawn as a ``Spec`` tree (printable, so hypothesis shows a falsifying model as a short
expression), built by ``Case.build()`` with seeded weights, and run by ``case_truth``:

* module calls are cloned by plain forward hooks at the moment they return (``truth.hook_truth``);
* functional ops are cloned by the model itself: each generated ``forward`` calls ``_op(self,
  "add", h)`` right after the op, which records a clone while ``case_truth`` runs and does
  nothing otherwise (under torch.fx it sees a Proxy and is not traced: it is plain Python).

The op names are derived here, independently of fxtap: ``<scope>.<op>``, numbered ``_1``,
``_2``... per full name in execution order. No generated module, parameter or buffer has a name
that collides with an op name or ends in ``_<digits>``, so fxtap's collision rules never apply.

What the blocks cover: nn.Sequential, nn.ModuleList, nn.ModuleDict and custom modules; residual
adds (out of place and in place), concatenation, view/flatten/reshape, arithmetic between
branches; one module instance called two or three times; in-place ops (ReLU(inplace=True),
``+=``, ``.add_()``, ``F.relu(inplace=True)``, ``.relu_()``, ``.mul_()``, through an alias or a
view) after a tapped value; dropout and batch norm; a branch on ``self.training``; tuple and
dict valued submodules; a submodule called with a keyword input; a block that reads a config
object (``self.config.gain``); when asked for (``stateful``),
buffers written in place and read later (``Stateful``: an EMA, a counter, a queue); and, when asked for, code that
torch.fx cannot trace (a branch on a tensor, a data-dependent loop, ``int(x.shape[0])``) or
whose semantics a graph cannot hold (a grad-mode or autocast context in forward, a user hook
that changes a block's input or output, code that tells apart by ``isinstance`` what a hooked
module returned), nested at random depth, possibly in the root's own
``forward``.

In-place ops only ever write into a tensor that a ``Linear`` (or a ``Sequential`` ending in one)
has just returned, possibly through an alias (``Identity``, ``Dropout``) or a view: such a
tensor is not saved for backward yet, so every generated model also runs ``backward``.
"""

from __future__ import annotations

import collections
import contextvars
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

from .truth import hook_truth

W = 8  # feature width of every block
B = 4  # batch size (batch norm in train mode needs more than one)

_RECORDING: contextvars.ContextVar[_Recorder | None] = contextvars.ContextVar("fxtap_test_recording", default=None)


# -- the recorder ---------------------------------------------------------------------------------------
@dataclass
class _Recorder:
    values: dict[str, Any] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    edits: dict[str, Any] = field(default_factory=dict)  # op name -> fn: the line's value becomes fn(value)

    def name(self, full: str) -> str:
        k = self.counts.get(full, 0)
        self.counts[full] = k + 1
        return full if k == 0 else f"{full}_{k}"


def seed_rng(value: int) -> None:
    """Seed the CPU RNG. (``torch.manual_seed`` also queues CUDA seeding, capturing a stack trace
    each time: 5 ms a call, a quarter of these tests' time.)"""
    torch.default_generator.manual_seed(value)


def _op(module: nn.Module, op: str, value: torch.Tensor) -> torch.Tensor:
    """Record ``value`` as the op ``op`` of ``module``'s forward (only inside ``case_truth``)."""
    recorder = _RECORDING.get()
    if recorder is not None and module._code == "traced":
        name = recorder.name(f"{module._scope}.{op}" if module._scope else op)
        edit = recorder.edits.get(name)
        if edit is not None:
            value = edit(value)  # as if the edit were written in this line
        recorder.values[name] = value.detach().clone()
        recorder.order.append(name)
    return value


# -- blocks: each maps a (B, W) tensor to a (B, W) tensor -------------------------------------------------
class Untraceable(nn.Module):
    """Marks blocks whose own code torch.fx cannot trace."""


class Stack(nn.Module):
    def __init__(self, children: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(children)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Router(nn.Module):
    def __init__(self, p: nn.Module, q: nn.Module, how: str) -> None:
        super().__init__()
        self.d = nn.ModuleDict({"p": p, "q": q})
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "sum":
            return _op(self, "add", self.d["p"](x) + self.d["q"](x))
        for key in self.d:
            x = self.d[key](x)
        return x


class Residual(nn.Module):
    def __init__(self, body: nn.Module, how: str) -> None:
        super().__init__()
        self.body = body
        self.proj = nn.Linear(W, W)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(self.body(x))
        if self.how == "+":
            return _op(self, "add", h + x)
        if self.how == "torch.add":
            return _op(self, "add", torch.add(h, x))
        if self.how == "+=":
            h += x
            return _op(self, "add", h)
        return _op(self, "add_", h.add_(x))


class Concat(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.a = a
        self.b = b
        self.proj = nn.Linear(2 * W, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(_op(self, "cat", torch.cat([self.a(x), self.b(x)], dim=1)))


class Arith(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module, how: str) -> None:
        super().__init__()
        self.a = a
        self.b = b
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.a(x), self.b(x)
        if self.how == "*":
            return _op(self, "mul", u * v)
        return _op(self, "sub", u - v)


class View(nn.Module):
    def __init__(self, inner: nn.Module, how: str) -> None:
        super().__init__()
        self.inner = inner  # acts on the last dimension, W // 2
        self.how = how
        if how == "nn.Flatten":
            self.flat = nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inner(_op(self, "view", x.view(-1, 2, W // 2)))
        if self.how == "torch.flatten":
            return _op(self, "flatten", torch.flatten(h, 1))
        if self.how == ".flatten":
            return _op(self, "flatten", h.flatten(1))
        if self.how == ".reshape":
            return _op(self, "reshape", h.reshape(-1, W))
        return self.flat(h)


class Repeat(nn.Module):
    """One module instance called ``times`` times in one forward."""

    def __init__(self, f: nn.Module, times: int, how: str) -> None:
        super().__init__()
        self.f = f
        self.times = times
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "chain":
            for _ in range(self.times):
                x = self.f(x)
            return x
        y = self.f(x)
        for _ in range(self.times - 1):
            y = _op(self, "add", y + self.f(x))
        return y


class Inplace(nn.Module):
    """``h = prod(x)``, then an in-place op on ``h`` (directly, through an alias or a view)."""

    def __init__(self, prod: nn.Module, how: str, via: str) -> None:
        super().__init__()
        self.prod = prod  # a Linear, or a Sequential ending in one: its output is fresh
        self.how = how
        self.via = via
        if via == "identity":
            self.pass_ = nn.Identity()
        elif via == "dropout":
            self.pass_ = nn.Dropout(0.5)
        if how == "act":
            self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.prod(x)
        if self.via == "view":
            t = _op(self, "view", h.view(-1, 2, W // 2))
        elif self.via == "none":
            t = h
        else:
            t = self.pass_(h)
        other = x if self.via != "view" else 1.0
        if self.how == "act":
            t = self.act(t)
        elif self.how == "+=":
            t += other
            t = _op(self, "add", t)
        elif self.how == "add_":
            t = _op(self, "add_", t.add_(other))
        elif self.how == "F.relu":
            t = _op(self, "relu", F.relu(t, inplace=True))
        elif self.how == "relu_":
            t = _op(self, "relu_", t.relu_())
        else:
            t = _op(self, "mul_", t.mul_(0.5))
        return h if self.via == "view" else t


def _tick(module: nn.Module, op: str) -> None:
    """Count an op FX records but whose value is no tensor to compare (a size, a tuple, ``setitem``)."""
    recorder = _RECORDING.get()
    if recorder is not None and module._code == "traced":
        recorder.name(f"{module._scope}.{op}" if module._scope else op)


class Shapes(nn.Module):
    """Sizes and indexing: ``h.shape[0]``, ``h.size(-1) // 2``, ``a, b = h.chunk(2)``, ``h[:, 1] += 1``.
    FX records ``getattr``, ``getitem`` and the arithmetic on sizes too, which eager code does not show
    (drawn only with ``cases(shapes=True)``)."""

    def __init__(self, inner: nn.Module, how: str) -> None:
        super().__init__()
        self.inner = inner
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inner(x)
        if self.how == "shape":
            n = h.shape[0]
            _tick(self, "getattr"), _tick(self, "getitem")
            v = _op(self, "view", h.view(n, 2, W // 2))
            u = _op(self, "getitem", v[:, 0])
            w = _op(self, "mul", _op(self, "getitem", v[:, 1]) * 2.0)
            return _op(self, "cat", torch.cat([u, w], 1))
        if self.how == "size":
            d = h.size(-1)
            _tick(self, "size")
            h = _op(self, "truediv", h / d)
            half = d // 2
            _tick(self, "floordiv")
            return _op(self, "cat", torch.cat([_op(self, "getitem", h[:, half:]), _op(self, "getitem", h[:, :half])], 1))
        if self.how == "unpack":
            a, b = h.chunk(2, dim=1)
            _tick(self, "chunk"), _tick(self, "getitem"), _tick(self, "getitem")
            return _op(self, "cat", torch.cat([_op(self, "sub", b - a), a], 1))
        h = _op(self, "clone", h.clone())
        h[:, 0] = 0
        _tick(self, "setitem")
        row = h[:, 1]
        _tick(self, "getitem")
        row += 1
        _tick(self, "add")
        h[:, 1] = row
        _tick(self, "setitem")
        return _op(self, "neg", -h)


class TrainBranch(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.a = a
        self.b = b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.training:
            h = _op(self, "add", h + self.b(h))
        return _op(self, "dropout", F.dropout(h, 0.25, self.training))


PairTuple = collections.namedtuple("PairTuple", "u v")


@dataclasses.dataclass
class PairData:
    u: torch.Tensor
    v: torch.Tensor


class Pair(nn.Module):
    """Returns two values as a tuple, a dict, a namedtuple or a dataclass: FX must write each
    container into generated code, hooks must copy it, and both must return it as it is."""

    def __init__(self, a: nn.Module, b: nn.Module, how: str) -> None:
        super().__init__()
        self.a = a
        self.b = b
        self.how = how

    def forward(self, x: torch.Tensor) -> Any:
        if self.how == "tuple":
            return self.a(x), self.b(x)
        if self.how == "namedtuple":
            return PairTuple(self.a(x), self.b(x))
        if self.how == "dataclass":
            return PairData(self.a(x), self.b(x))
        return {"u": self.a(x), "v": self.b(x)}


class PairUse(nn.Module):
    def __init__(self, pair: Pair) -> None:
        super().__init__()
        self.pair = pair

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pair(x)
        if isinstance(p, tuple):
            return _op(self, "mul", p[0] * p[1])
        if isinstance(p, PairData):
            return _op(self, "sub", p.u - p.v)
        return _op(self, "sub", p["u"] - p["v"])


class HookedPair(Pair):
    """A ``Pair`` (or, ``how="tensor"``, one tensor) with a user hook that scales what it returns,
    keeping its type: in a graph it is one opaque step, whose output is a Proxy while tracing."""

    def __init__(self, a: nn.Module, b: nn.Module, how: str) -> None:
        super().__init__(a, b, how)
        self.register_forward_hook(_steer_pair)

    def forward(self, x: torch.Tensor) -> Any:
        if self.how == "tensor":
            return _op(self, "add", self.a(x) + self.b(x))
        return super().forward(x)


def _steer_pair(module: nn.Module, inputs: Any, output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output * 0.5
    if isinstance(output, dict):
        return {key: value * 0.5 for key, value in output.items()}
    if isinstance(output, PairData):
        return PairData(output.u * 0.5, output.v * 0.5)
    return type(output)(*(value * 0.5 for value in output)) if isinstance(output, PairTuple) else tuple(v * 0.5 for v in output)


class TypedPairUse(PairUse, Untraceable):
    """Tells apart what an opaque module returned by its type (``isinstance``): while tracing it
    is a Proxy, so no graph can hold this code (the class of the ``test_opaque_leaf_output_checked_
    with_isinstance`` regression): it runs eagerly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pair(x)
        if isinstance(p, torch.Tensor):
            return _op(self, "neg", -p)
        if isinstance(p, tuple):
            return _op(self, "mul", p[0] * p[1])
        if isinstance(p, PairData):
            return _op(self, "sub", p.u - p.v)
        return _op(self, "sub", p["u"] - p["v"])


class Mix(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(W, W)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, *, gain: float = 1.0) -> torch.Tensor:
        h = x if y is None else _op(self, "add", x + self.lin(y))
        return _op(self, "mul", h * gain)


class MixUse(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.a = a
        self.b = b
        self.mix = Mix()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(self.a(x), y=self.b(x), gain=0.5)


class Configured(nn.Module):
    """Reads a config object, as Hugging Face modules read ``self.config``: a trace bakes its
    values in (the live property changes them after ``tap()``)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.config = SimpleNamespace(gain=1.5, sub=SimpleNamespace(shift=0.25))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _op(self, "mul", self.inner(x) * self.config.gain)
        return _op(self, "add", h + self.config.sub.shift)


class Stateful(nn.Module):
    """Model state: a buffer written in place and read later, in this call or the next.

    ``ema``: a running mean of ``h`` updated in training only and read in both modes; ``counter``:
    a tensor counter (``self.count += 1``) scaling the output; ``last``: the previous call's ``h``
    (read, then overwritten with ``copy_``, then read again); ``queue``: a MoCo-style queue and
    its pointer (``index_copy_``), read before the update. Every op is recorded, in order.
    """

    def __init__(self, inner: nn.Module, how: str) -> None:
        super().__init__()
        self.inner = inner
        self.how = how
        if how == "counter":
            self.register_buffer("count", torch.zeros((), dtype=torch.long))
        elif how == "queue":
            self.register_buffer("queue", torch.randn(2 * B, W))
            self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))
        else:
            self.register_buffer("stat", torch.zeros(W if how == "ema" else (B, W)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inner(x)
        if self.how == "ema":
            if self.training:
                m = _op(self, "mean", _op(self, "detach", h.detach()).mean(0))
                _op(self, "add_", _op(self, "mul_", self.stat.mul_(0.5)).add_(m))
            return _op(self, "add", h + self.stat)
        if self.how == "counter":
            self.count += 1
            _op(self, "add", self.count)
            return _op(self, "mul", h * self.count)
        if self.how == "last":
            d = _op(self, "sub", h - self.stat)
            _op(self, "copy_", self.stat.copy_(_op(self, "detach", h.detach())))
            return _op(self, "add", d + self.stat)
        scores = _op(self, "matmul", h @ self.queue.T)
        idx = _op(self, "mod", _op(self, "add", self.ptr + torch.arange(B)) % (2 * B))
        _op(self, "index_copy_", self.queue.index_copy_(0, idx, _op(self, "detach", h.detach())))
        _op(self, "copy_", self.ptr.copy_(_op(self, "mod", _op(self, "add", self.ptr + B) % (2 * B))))
        return _op(self, "add", h + _op(self, "mean", scores.mean(1, keepdim=True)))


class Gate(Untraceable):
    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.a = a
        self.b = b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # a branch on a tensor's value
            return self.a(x)
        return self.b(x)


class DataLoop(Untraceable):
    def __init__(self, f: nn.Module) -> None:
        super().__init__()
        self.f = f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(1 + int(x.sum() > 0)):  # called once or twice, depending on the data
            x = self.f(x)
        return x


class IntShape(Untraceable):
    def __init__(self, f: nn.Module) -> None:
        super().__init__()
        self.f = f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = int(x.shape[0])  # a Proxy has no int()
        return self.f(x).reshape(n, W)


class Ctx(Untraceable):
    """A context manager in forward (grad mode, autocast, the random generator's state put back):
    a graph cannot record it, so fxtap runs this block eagerly, exactly as untraceable code."""

    def __init__(self, f: nn.Module, how: str) -> None:
        super().__init__()
        self.f = f
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "no_grad":
            with torch.no_grad():
                y = self.f(x)
        elif self.how == "set_grad_enabled":
            with torch.set_grad_enabled(False):
                y = self.f(x)
        elif self.how == "enable_grad":
            with torch.enable_grad():
                y = self.f(x)
        elif self.how == "fork_rng":  # draws that leave the generator where it was, then one more
            with torch.random.fork_rng():
                y = self.f(x) + torch.randn_like(x)
            y = y + torch.randn_like(x)
        elif self.how == "rng_state":
            state = torch.get_rng_state()
            y = self.f(x) * torch.rand_like(x)
            torch.set_rng_state(state)
            y = y + torch.rand_like(x)
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = self.f(x)
        return x + y.float()


class Hooked(nn.Module):
    """A block with a user hook that changes its input or output (activation steering). fxtap
    cannot trace through user hooks: in a graph this block is one opaque step; traced on its
    own (under eager code) its own ``__call__`` runs the hook around its graph."""

    def __init__(self, f: nn.Module, how: str) -> None:
        super().__init__()
        self.f = f
        if how == "forward":
            self.register_forward_hook(_steer_output)
        elif how == "pre":
            self.register_forward_pre_hook(_steer_input)
        else:
            self.register_forward_hook(_steer_kwargs, with_kwargs=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _op(self, "add", x + self.f(x))


def _steer_output(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    return output * 0.5 + 0.25


def _steer_input(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return (inputs[0] - 0.5,)


def _steer_kwargs(module: nn.Module, args: Any, kwargs: Any, output: torch.Tensor) -> torch.Tensor:
    return -output


# -- the root: several inputs, keyword inputs, tensor / tuple / dict outputs ---------------------------
class _Root(nn.Module):
    def __init__(self, body: nn.Module, out: str, untraceable: bool) -> None:
        super().__init__()
        self.body = body
        self.in_y = nn.Linear(W, W)
        self.in_z = nn.Linear(W, W)
        self.aux = nn.Linear(W, W)
        self.out = out
        self.untraceable = untraceable

    def _run(self, x: torch.Tensor, y: torch.Tensor | None, z: torch.Tensor | None, scale: float) -> Any:
        h = x
        if y is not None:
            h = _op(self, "add", h + self.in_y(y))
        if z is not None:
            h = _op(self, "mul", h * _op(self, "sigmoid", torch.sigmoid(self.in_z(z))))
        if scale != 1.0:
            h = _op(self, "mul", h * scale)
        if self.untraceable and h.sum() > 0:
            h = _op(self, "add", h + 1.0)
        h = self.body(h)
        if self.out == "tensor":
            return h
        if self.out == "tuple":
            return h, self.aux(h)
        return {"out": h, "aux": self.aux(h)}


class Root1(_Root):
    def forward(self, x: torch.Tensor) -> Any:
        return self._run(x, None, None, 1.0)


class Root2(_Root):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        return self._run(x, y, None, 1.0)


class RootKw(_Root):
    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, *, z: torch.Tensor | None = None, scale: float = 1.0) -> Any:
        return self._run(x, y, z, scale)


# -- specs ------------------------------------------------------------------------------------------------
LEAVES = ("linear", "tanh", "relu", "gelu", "layernorm", "batchnorm", "dropout", "identity")
COMPOSITES = ("seq", "stack", "router", "residual", "concat", "arith", "view", "repeat", "inplace", "train", "pair", "mix", "config")
UNTRACEABLE = ("gate", "loop", "intshape", "ctx", "hooked", "typedpair")  # the last three: semantics a graph cannot hold


@dataclass(frozen=True)
class Spec:
    kind: str
    children: tuple[Spec, ...] = ()
    how: str = ""

    def __repr__(self) -> str:
        inner = [repr(c) for c in self.children] + ([repr(self.how)] if self.how else [])
        return f"{self.kind}({', '.join(inner)})" if inner else self.kind


def _leaf(kind: str, width: int = W) -> nn.Module:
    if kind == "linear":
        return nn.Linear(width, width)
    if kind == "layernorm":
        return nn.LayerNorm(width)
    if kind == "batchnorm":
        bn = nn.BatchNorm1d(width)
        with torch.no_grad():  # non-trivial running statistics for eval mode
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
        return bn
    if kind == "dropout":
        return nn.Dropout(0.5)
    return {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "identity": nn.Identity}[kind]()


def build_block(spec: Spec) -> nn.Module:
    kind, how = spec.kind, spec.how
    kids = [build_block(c) for c in spec.children]
    if kind in LEAVES:
        return _leaf(kind)
    if kind == "seq":
        return nn.Sequential(*kids)
    if kind == "fresh":  # a Sequential ending in a Linear (or the Linear alone)
        return nn.Sequential(*kids, nn.Linear(W, W)) if kids else nn.Linear(W, W)
    simple: dict[str, Any] = {
        "stack": lambda: Stack(kids),
        "router": lambda: Router(kids[0], kids[1], how),
        "residual": lambda: Residual(kids[0], how),
        "concat": lambda: Concat(kids[0], kids[1]),
        "arith": lambda: Arith(kids[0], kids[1], how),
        "view": lambda: View(_leaf(spec.children[0].kind, W // 2), how),
        "repeat": lambda: Repeat(kids[0], int(how[-1]), how[:-1]),
        "inplace": lambda: Inplace(kids[0], *how.split("/")),
        "train": lambda: TrainBranch(kids[0], kids[1]),
        "pair": lambda: PairUse(Pair(kids[0], kids[1], how)),
        "mix": lambda: MixUse(kids[0], kids[1]),
        "config": lambda: Configured(kids[0]),
        "state": lambda: Stateful(kids[0], how),
        "gate": lambda: Gate(kids[0], kids[1]),
        "loop": lambda: DataLoop(kids[0]),
        "intshape": lambda: IntShape(kids[0]),
        "ctx": lambda: Ctx(kids[0], how),
        "hooked": lambda: Hooked(kids[0], how),
        "typedpair": lambda: TypedPairUse(HookedPair(kids[0], kids[1], how)),
        "shapes": lambda: Shapes(kids[0], how),
    }
    return simple[kind]()


_HOW = {
    "router": ("sum", "chain"),
    "residual": ("+", "+=", "add_", "torch.add"),
    "arith": ("*", "-"),
    "view": ("torch.flatten", ".flatten", ".reshape", "nn.Flatten"),
    "repeat": ("chain2", "chain3", "sum2", "sum3"),
    "pair": ("tuple", "dict", "namedtuple", "dataclass"),
    "state": ("ema", "counter", "last", "queue"),
    "ctx": ("no_grad", "set_grad_enabled", "enable_grad", "autocast", "fork_rng", "rng_state"),
    "hooked": ("forward", "pre", "kwargs"),
    "typedpair": ("tuple", "dict", "namedtuple", "dataclass", "tensor"),
    "shapes": ("shape", "size", "unpack", "setitem"),
}
_ARITY = {
    "state": 1, "router": 2, "residual": 1, "concat": 2, "arith": 2, "repeat": 1, "train": 2, "pair": 2,
    "mix": 2, "config": 1, "gate": 2, "loop": 1, "intshape": 1, "ctx": 1, "hooked": 1, "typedpair": 2, "shapes": 1,
}  # fmt: skip
_INPLACE_HOW = ("act", "+=", "add_", "F.relu", "relu_", "mul_")
_INPLACE_VIA = ("none", "identity", "dropout", "view")


@st.composite
def blocks(draw: st.DrawFn, depth: int, untraceable: bool, stateful: bool = False, shapes: bool = False) -> Spec:
    """A random block of at most ``depth`` levels of nesting (``stateful``: also blocks with
    buffers written in place; at least one when it is the top level's only choice; ``shapes``:
    also ``Shapes`` blocks, in most drawn models)."""
    kinds = LEAVES if depth == 0 else LEAVES[:2] + COMPOSITES + (UNTRACEABLE if untraceable else ())
    if stateful and depth > 0:
        kinds += ("state",) * 4  # state in most drawn models
    if shapes and depth > 0:
        kinds += ("shapes",) * 4
    kind = draw(st.sampled_from(kinds))
    if kind in LEAVES:
        return Spec(kind)
    child = blocks(depth - 1, untraceable, stateful, shapes)
    if kind in ("seq", "stack"):
        return Spec(kind, tuple(draw(st.lists(child, min_size=1, max_size=3))))
    if kind == "view":
        return Spec(kind, (Spec(draw(st.sampled_from(("linear", "tanh", "layernorm", "identity")))),), draw(st.sampled_from(_HOW["view"])))
    if kind == "inplace":
        body = tuple(draw(st.lists(child, max_size=2)))
        how = f"{draw(st.sampled_from(_INPLACE_HOW))}/{draw(st.sampled_from(_INPLACE_VIA))}"
        return Spec(kind, (Spec("fresh", body),), how)
    children = tuple(draw(child) for _ in range(_ARITY[kind]))
    how = draw(st.sampled_from(_HOW[kind])) if kind in _HOW else ""
    return Spec(kind, children, how)


@dataclass(frozen=True)
class Case:
    """A drawn model with its inputs: ``build()`` makes them, the same each time."""

    body: Spec
    signature: str  # "x", "x,y" or "x,y=,z=,scale="
    call: tuple[str, ...]  # how the inputs are passed, e.g. ("x", "y=", "scale=")
    out: str  # "tensor", "tuple" or "dict"
    root_untraceable: bool
    train: bool
    seed: int

    def build(self) -> tuple[nn.Module, tuple[Any, ...], dict[str, Any]]:
        seed_rng(self.seed)
        root_class = {"x": Root1, "x,y": Root2, "x,y=,z=,scale=": RootKw}[self.signature]
        model = root_class(build_block(self.body), self.out, self.root_untraceable)
        _annotate(model)
        model.train(self.train)
        values = {"x": torch.randn(B, W), "y": torch.randn(B, W), "z": torch.randn(B, W), "scale": 0.5}
        args = tuple(values[name] for name in self.call if not name.endswith("="))
        kwargs = {name[:-1]: values[name[:-1]] for name in self.call if name.endswith("=")}
        return model, args, kwargs

    @property
    def optional_inputs(self) -> bool:
        """Whether the call passes an optional argument of ``forward``."""
        return self.signature == "x,y=,z=,scale=" and self.call != ("x",)

    @property
    def untraceable(self) -> bool:
        return self.root_untraceable or any(s.kind in UNTRACEABLE for s in _walk(self.body))


def _walk(spec: Spec) -> Iterator[Spec]:
    yield spec
    for child in spec.children:
        yield from _walk(child)


def _annotate(model: nn.Module) -> None:
    """Give every module its scope (path), how its own code runs and how its calls are captured.

    The rules of docs/fallback.md: code runs ``"traced"`` (in the graph, or in a child of
    untraceable code traced on its own), ``"eager"`` (untraceable code whose children are traced
    on their own: the root's, and then each untraceable child's in turn) or ``"opaque"`` (an
    untraceable leaf of a graph, and everything inside it). A call from traced code is a graph
    node (``"fx"``); a call from opaque code is hooked; a call from eager code is traced on its
    own (``"fx"``) unless the callee is a ``torch.nn`` leaf or untraceable itself, or has user
    forward hooks, which may change its output after its graph ran (``"hook"``).
    """
    code = {"": "eager" if model.untraceable else "traced"}
    model._scope, model._code, model._call = "", code[""], "fx"
    for path, module in model.named_modules():
        if not path:
            continue
        parent = code[path.rpartition(".")[0]]
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            code[path], call = parent, "fx"  # never called: its children are called by its owner
        elif parent == "traced":
            code[path], call = ("opaque" if isinstance(module, (Untraceable, Hooked, HookedPair)) else "traced"), "fx"
        elif parent == "opaque":
            code[path], call = "opaque", "hook"
        elif isinstance(module, Untraceable):
            code[path], call = "eager", "hook"
        else:
            standard = type(module).__module__.startswith("torch.nn") and not isinstance(module, nn.Sequential)
            code[path], call = ("opaque", "hook") if standard else ("traced", "fx")
            if module._forward_hooks:  # traced on its own, but its output is what the user's forward hooks made of it
                call = "hook"
        module._scope, module._code, module._call = path, code[path], call


_CALLS = {
    "x": [("x",)],
    "x,y": [("x", "y"), ("x", "y=")],
    "x,y=,z=,scale=": [("x",), ("x", "y"), ("x", "y="), ("x", "z="), ("x", "y", "z=", "scale="), ("x", "scale=")],
}


@st.composite
def cases(draw: st.DrawFn, *, untraceable: bool = False, train: bool | None = None, stateful: bool = False, shapes: bool = False) -> Case:
    """A random model and inputs; ``untraceable=True`` allows code torch.fx cannot trace,
    ``stateful=True`` blocks whose buffers change on every call (``Stateful``), ``shapes=True``
    blocks that compute with sizes and index tensors (``Shapes``)."""
    # sampled_from draws uniformly (st.integers leans to its low end) and still shrinks to the first item
    body = draw(blocks(draw(st.sampled_from((1, 2, 3))), untraceable, stateful, shapes))
    signature = draw(st.sampled_from(list(_CALLS)))
    call = draw(st.sampled_from(_CALLS[signature]))
    out = draw(st.sampled_from(("tensor", "tuple", "dict")))
    root_untraceable = untraceable and draw(st.sampled_from((False,) * 4 + (True,)))
    is_train = draw(st.sampled_from((False, True))) if train is None else train
    return Case(body, signature, call, out, root_untraceable, is_train, draw(st.integers(0, 2**16)))


# -- the truth -------------------------------------------------------------------------------------------
@dataclass
class Truth:
    """What one eager forward did: every value, cloned at the moment it was produced."""

    values: dict[str, Any]  # module calls and functional ops, plus "output"
    modules: list[str]  # module calls, in the order they returned
    ops: list[str]  # functional ops in traced code, in execution order
    order: list[str]  # both, interleaved in the order they completed
    hook_only: set[str]  # module calls that mode="auto" captures with hooks

    @property
    def names(self) -> list[str]:
        """Every name fxtap can be asked for, in the order the values were produced."""
        return [n for n in self.order if n in self.values]


def case_truth(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *, seed: int = 0) -> Truth:
    """Run ``model`` once eagerly (RNG seeded with ``seed``) and record the truth."""
    recorder = _Recorder()
    counts: dict[str, int] = {}
    hook_only: set[str] = set()

    def leave(path: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            k = counts.get(path, 0)
            counts[path] = k + 1
            name = path if k == 0 else f"{path}_{k}"
            recorder.order.append(name)
            if module._call == "hook":
                hook_only.add(name)

        return hook

    handles = [m.register_forward_hook(leave(p)) for p, m in model.named_modules() if p]
    token = _RECORDING.set(recorder)
    try:
        seed_rng(seed)
        modules = hook_truth(model, *args, **kwargs)
    finally:
        _RECORDING.reset(token)
        for handle in handles:
            handle.remove()
    values = {**modules, **recorder.values}
    module_names = [n for n in modules if n != "output"]
    return Truth(values, module_names, list(recorder.values), recorder.order, hook_only)


def edited_truth(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], edits: dict[str, Any], *, seed: int = 0
) -> tuple[Any, dict[str, Any]]:
    """Run ``model`` eagerly with ``edits`` (name -> fn) applied, without fxtap: a module call's
    edit is a plain forward hook returning ``fn(output)``; an op's edit is applied by the model's
    own code in the op's line (``_op``). Returns the output and every value after its edit."""
    recorder = _Recorder(edits={n: f for n, f in edits.items()})
    counts: dict[str, int] = {}
    values: dict[str, Any] = {}

    def make(path: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            k = counts.get(path, 0)
            counts[path] = k + 1
            name = path if k == 0 else f"{path}_{k}"
            fn = edits.get(name)
            result = output if fn is None else fn(output)
            values[name] = _clone(result)
            return None if fn is None else result

        return hook

    handles = [m.register_forward_hook(make(p)) for p, m in model.named_modules() if p]
    token = _RECORDING.set(recorder)
    try:
        seed_rng(seed)
        output = model(*args, **kwargs)
    finally:
        _RECORDING.reset(token)
        for handle in handles:
            handle.remove()
    return output, {**values, **recorder.values}


def _clone(value: Any) -> Any:
    from .truth import _clone as clone  # namedtuples and dataclasses too

    return clone(value)


# -- values a forward makes and returns (the export frontend rebuilds them around its graph) -------------


class Bag:
    """A plain object that a forward makes and fills with tensors, as transformers' ``DynamicCache``
    and its layers are."""


def output_recipes(max_leaves: int = 10) -> st.SearchStrategy[Any]:
    """Recipes (``make_output``) of a value a forward returns: tensors computed from the input,
    simple constants, and lists, tuples, dicts and ``Bag`` objects of them, nested."""
    constants = st.one_of(st.none(), st.integers(-3, 3), st.booleans(), st.sampled_from(["a", "b"]))
    leaves = st.one_of(st.tuples(st.just("tensor"), st.integers(1, 5)), st.tuples(st.just("constant"), constants))
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.tuples(st.sampled_from(["list", "tuple"]), st.lists(inner, max_size=3).map(tuple)),
            st.tuples(st.sampled_from(["dict", "bag"]), st.dictionaries(st.sampled_from(["keys", "values", "layers"]), inner, max_size=3)),
        ),
        max_leaves=max_leaves,
    )


def make_output(recipe: Any, x: torch.Tensor) -> Any:
    """The value ``recipe`` describes, its tensors computed from ``x`` (a new value each call)."""
    kind, body = recipe
    if kind == "tensor":
        return x * body + body
    if kind == "constant":
        return body
    if kind in ("list", "tuple"):
        items = [make_output(r, x) for r in body]
        return items if kind == "list" else tuple(items)
    if kind == "dict":
        return {k: make_output(v, x) for k, v in body.items()}
    bag = Bag()
    for k, v in body.items():
        setattr(bag, k, make_output(v, x))
    return bag
