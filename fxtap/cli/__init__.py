"""The ``fxtap`` command: list tap names, tap a model, compare its paths, export its taps, and
extract the features of an image folder (also under torchrun).

Every command takes MODEL: a torchvision model name (``resnet50``), ``timm:NAME`` or
``package.module:factory``. Nothing is downloaded: without ``--weights`` the model has random
weights (seeded by ``--seed``) and the command says so. Wrong input prints one line to stderr
and exits with status 2. See docs/cli.md.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fxtap

from .._errors import FxtapError, MissingCallError, TapNameError
from .._text import table
from .zoo import Loaded, load_model, one_line

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the ``fxtap`` command line with ``argv`` (default: ``sys.argv[1:]``); return the exit status.

    Status 0: done; 1: ``compare`` found a mismatch; 2: wrong input (argparse's usage errors
    raise ``SystemExit(2)`` themselves).
    """
    args = _parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return int(args.run(args))
        except (FxtapError, OSError) as error:
            print(f"fxtap: error: {_message(error, args)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as interrupt:
            print(f"fxtap: {_interrupted(interrupt)}", file=sys.stderr)
            return 130


# -- commands ----------------------------------------------------------------------------------
def _nodes(args: argparse.Namespace) -> int:
    loaded = _load(args)
    model = loaded.model.train(args.train)
    from .._capture import describe

    every = describe(model, train=args.train, mode=args.mode)  # one trace for names, kinds and types
    shown = [name for name, *_ in every if args.grep in name] if args.grep else [name for name, *_ in every]
    if not shown:
        raise FxtapError(f"no tap name of {type(model).__name__} contains {args.grep!r} (it has {len(every)}; drop --grep to see them)")
    kinds = {info.name: (info.kind, info.module_type) for info in every}
    values, paths = _values_and_paths(model, shown, args)
    rows = [[name, *kinds[name], *_shape_dtype(values.get(name, _NOT_RUN)), paths[name]] for name in shown]
    _note_random_weights(args, loaded)
    print(table(["name", "kind", "module type", "shape", "dtype", "path"], rows))
    return 0


def _tap(args: argparse.Namespace) -> int:
    loaded = _load(args)
    tapped = fxtap.tap(loaded.model, args.names, mode=args.mode, detach=True)
    values = _forward(tapped, loaded.model, args)
    rows = [[name, *_shape_dtype(value), *_stats(value), tapped.paths[name]] for name, value in values.items()]
    _note_random_weights(args, loaded)
    print(table(["name", "shape", "dtype", "mean", "std", "min", "max", "path"], rows))
    return 0


def _extract(args: argparse.Namespace) -> int:
    from .. import _extract as library
    from . import extract as ex
    from . import text

    if (args.data is None) == (args.text is None):
        raise FxtapError("give the examples with --data DIR (images) or --text FILE (one example per line), one of them")
    if args.data is not None:
        data = Path(args.data)
        files = ex.find_images(data, limit=args.limit)
    else:
        lines = text.read_lines(Path(args.text), limit=args.limit)
    device = library._device(torch.nn.Module(), _device_of_rank(args.device))  # checked before the output folder exists
    loaded = _load(args)
    tapped = fxtap.tap(loaded.model, args.names, mode=args.mode, detach=True)
    tokenizer = text.tokenizer_for(args.model, args.tokenizer) if args.text is not None else None
    preprocess = loaded.preprocess if args.image_size is None else loaded.preprocess.scaled(args.image_size)
    out = _writable_folder(Path(args.output))
    _note_random_weights(args, loaded)
    config = {"spec": args.model, "weights_file": _digest(Path(args.weights)) if args.weights else None}
    options = {"pool": args.pool, "dtype": args.dtype, "out_dtype": args.out_dtype, "shard_size": args.shard_size, "device": device}
    bar = not args.quiet and sys.stderr.isatty()
    try:
        if args.text is not None:
            loader = text.text_loader(lines, tokenizer, batch_size=args.batch_size, max_length=args.max_length)
            config |= {"text": str(Path(args.text).resolve()), "tokenizer": args.tokenizer, "max_length": args.max_length}
            summary = library.run(tapped, list(args.names), loader, out, ids=lambda batch: batch, keys=text.line_keys(lines), config=config,
                                  bar=bar, warn=_warn_line, log=_info_line, **options)  # fmt: skip
        else:
            config |= {"preprocess": preprocess._asdict(), "data": str(data.resolve())}
            summary = ex.extract_folder(
                tapped, list(args.names), data, files, preprocess, out, config=config, batch_size=args.batch_size, workers=args.workers,
                bar=bar, warn=_warn_line, log=_info_line, **options,
            )  # fmt: skip
    except library.BatchFailedError as error:
        hint = "does it take these token ids? Check --tokenizer" if args.text is not None else "does it take images of that size? Try another --image-size"
        raise FxtapError(f"{error}; {hint}") from error
    if summary.manifest is not None:
        print(_summary_text(summary, out, "lines" if args.text is not None else "images"))
    return 0


def _compare(args: argparse.Namespace) -> int:
    loaded = _load(args)
    model = loaded.model.train(args.train)
    comparison = fxtap.compare(model, args.names, _example(args), rtol=args.rtol, atol=args.atol)
    _note_random_weights(args, loaded)
    print(comparison)
    return 0 if comparison.ok else 1


def _export(args: argparse.Namespace) -> int:
    folder = Path(args.output).parent
    if not folder.is_dir():
        raise FxtapError(f"cannot write {args.output!r}: folder {str(folder)!r} does not exist")
    loaded = _load(args)
    example = _example(args)
    try:
        path = fxtap.export(loaded.model, args.names, example, args.output, format=args.format)
    except ValueError as error:  # the model is in train mode, or the format is unknown
        raise FxtapError(str(error)) from error
    _note_random_weights(args, loaded)
    print(
        f"wrote {path} ({args.format}: {', '.join(args.names)}); its outputs match eager on a random input of shape {','.join(map(str, args.input_shape))}"
    )
    return 0


# -- what the commands share ---------------------------------------------------------------------
def _load(args: argparse.Namespace) -> Loaded:
    torch.manual_seed(args.seed)  # random weights (and inputs) are the same on every run and rank
    return load_model(args.model, weights=args.weights)


def _note_random_weights(args: argparse.Namespace, loaded: Loaded) -> None:
    """Say so when the model has random weights (once the input is known to be right)."""
    if loaded.random_weights and _main_rank():
        print(
            f"fxtap: note: {args.model} has random weights (seed {args.seed}): no --weights given, and fxtap never downloads any",
            file=sys.stderr,
        )


def _example(args: argparse.Namespace) -> torch.Tensor:
    """The random input of ``--input-shape`` and ``--input-dtype`` (integers: token ids in [0, 100))."""
    if args.input_dtype == "int64":
        return torch.randint(0, 100, args.input_shape)
    return torch.randn(args.input_shape)


def _forward(tapped: nn.Module, model: nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """One forward on a random input; a failing model becomes one clear error."""
    example = _example(args)
    shape = ",".join(map(str, args.input_shape))
    try:
        with torch.no_grad():
            return dict(tapped(example))
    except FxtapError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as error:
        text = one_line(error, 200)
        if example.is_floating_point() and re.search(r"indices|Long, Int|scalar type Long|embedding", text, re.IGNORECASE):
            raise FxtapError(
                f"{type(model).__name__} takes integer token ids, and got a random float32 input of shape {shape} "
                f"({type(error).__name__}: {text}); give integer input with --input-dtype int64 (and --input-shape N,L)"
            ) from error
        raise FxtapError(
            f"{type(model).__name__} failed on a random {args.input_dtype} input of shape {shape} "
            f"({type(error).__name__}: {text}); give its input shape with --input-shape (and --input-dtype int64 for token ids)"
        ) from error


def _values_and_paths(model: nn.Module, names: list[str], args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """The value of every name, from one forward (one per name if a module call is missing)."""
    tapped = fxtap.tap(model, names, mode=args.mode, detach=True)
    paths = tapped.paths
    try:
        return _forward(tapped, model, args), paths
    except MissingCallError:  # a listed module this input does not call: tap the names one by one
        values: dict[str, Any] = {}
        for name in names:
            try:
                values |= _forward(fxtap.tap(model, [name], mode=args.mode, detach=True), model, args)
            except MissingCallError:
                pass
        return values, paths


_NOT_RUN = object()


def _shape_dtype(value: Any) -> list[str]:
    if value is _NOT_RUN:
        return ["(not called)", ""]
    if isinstance(value, torch.Tensor):
        return [str(tuple(value.shape)), str(value.dtype).removeprefix("torch.")]
    if isinstance(value, (tuple, list)):
        inner = [_shape_dtype(item) for item in value]
        dtypes = sorted({dtype for _, dtype in inner if dtype})
        return [f"{type(value).__name__}[{', '.join(shape for shape, _ in inner)}]", ", ".join(dtypes)]
    if value is None:
        return ["None", ""]
    return [repr(value) if isinstance(value, (int, float, bool)) else "", type(value).__name__]


def _stats(value: Any) -> list[str]:
    if not isinstance(value, torch.Tensor) or value.numel() == 0:
        return ["", "", "", ""]
    value = value.double()
    return [f"{float(v):.4g}" for v in (value.mean(), value.std() if value.numel() > 1 else 0.0, value.min(), value.max())]


def _writable_folder(path: Path) -> Path:
    import tempfile

    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise FxtapError(f"cannot write to output folder {str(path)!r}: {error.strerror or error}") from error
    return path


def _digest(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def _summary_text(summary: Any, out: Path, what: str = "images") -> str:
    manifest = summary.manifest
    rows = [[name, str((manifest["rows"], *f["shape"])), f["dtype"]] for name, f in manifest["features"].items()]
    skipped = manifest["skipped"]
    shards = f"{_count(len(manifest['shards']), 'shard')} ({summary.computed} computed, {summary.reused} kept from an earlier run)"
    lines = [
        f"extracted {manifest['rows']} of {manifest['images']} {what} to {out}: {shards}",
        table(["name", "shape", "dtype"], rows),
        f"skipped {_count(len(skipped), 'unreadable ' + what.removesuffix('s'))}" + (":" if skipped else ""),
        *(f"  {item['file']}: {item['reason']}" for item in skipped),
        f"read them with fxtap.load_features({str(out)!r})",
    ]
    return "\n".join(lines)


def _interrupted(interrupt: KeyboardInterrupt) -> str:
    from .._extract import Interrupted

    if not isinstance(interrupt, Interrupted):
        return "interrupted"
    of = f" of {interrupt.total}" if interrupt.total is not None else ""
    return f"interrupted: {interrupt.finished}{of} shards finished in {interrupt.out}; run the same command again to resume"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _warn_line(text: str) -> None:
    from tqdm import tqdm  # type: ignore[import-untyped]

    tqdm.write(f"fxtap: warning: {text}", file=sys.stderr)


def _info_line(text: str) -> None:
    from tqdm import tqdm  # type: ignore[import-untyped]

    tqdm.write(f"fxtap: {text}", file=sys.stderr)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    text = _sentences([line.strip() for line in str(message).splitlines() if line.strip()])
    print(f"fxtap: warning: {text.removeprefix('fxtap: ')}", file=sys.stderr)


def _message(error: BaseException, args: argparse.Namespace) -> str:
    """The error on one line; a ``TapNameError`` points at ``fxtap nodes`` instead of ``fxtap.names``."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if isinstance(error, TapNameError):
        lines = [line for line in lines if not line.startswith("List them with")]
        lines.append(f"List them with: fxtap nodes {args.model}")
    return _sentences(lines)


def _sentences(lines: list[str]) -> str:
    """Lines joined into one, with a full stop after a line that has no closing punctuation, and
    Python keywords said as the flags of the command line (``mode="hooks"`` -> ``--mode hooks``)."""
    text = " ".join(line if line.endswith((".", "?", "!", ":", ";")) or i == len(lines) - 1 else f"{line}." for i, line in enumerate(lines))
    return _as_flags(text)


def _as_flags(text: str) -> str:
    text = re.sub(r"""\bmode=["'](\w+)["']""", r"--mode \1", text)
    return re.sub(r"\btrain=True\b", "--train", text)


# -- arguments ---------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxtap", description="Intermediate activations of PyTorch models, by name.")
    parser.add_argument("--version", action="version", version=f"fxtap {fxtap.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("model", metavar="MODEL", help="torchvision name (resnet50), timm:NAME, or package.module:factory")
    model.add_argument("--weights", metavar="PATH", help="a state dict (torch.save or .safetensors); default: random weights")
    model.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default 0)")
    mode = argparse.ArgumentParser(add_help=False)
    mode.add_argument("--mode", choices=("auto", "fx", "hooks"), default="auto", help="how values are captured (default auto)")
    shape = argparse.ArgumentParser(add_help=False)
    shape.add_argument("--input-shape", type=_shape, default=(1, 3, 224, 224), metavar="N,C,H,W", help="random input (default 1,3,224,224)")
    shape.add_argument(
        "--input-dtype", choices=("float32", "int64"), default="float32", help="float32 (randn) or int64 (token ids in [0, 100)); default float32"
    )
    names = argparse.ArgumentParser(add_help=False)
    names.add_argument("names", nargs="+", metavar="NAME", help="tap names (list them with fxtap nodes MODEL)")

    nodes = commands.add_parser("nodes", parents=[model, mode, shape], help="every tap name with its kind, module type, shape and path")
    nodes.add_argument("--grep", metavar="TEXT", help="only names that contain TEXT")
    nodes.add_argument("--train", action="store_true", help="the train-mode graph (default: eval)")
    nodes.set_defaults(run=_nodes)

    tap = commands.add_parser("tap", parents=[model, names, mode, shape], help="shape, dtype and statistics of some tapped values")
    tap.set_defaults(run=_tap)

    compare = commands.add_parser(
        "compare", parents=[model, names, shape], help="FX path, hook path and truth side by side; status 1 if not ok"
    )
    compare.add_argument("--rtol", type=float, default=1.3e-6, help="relative tolerance (default 1.3e-6)")
    compare.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance (default 1e-5)")
    compare.add_argument("--train", action="store_true", help="compare in train mode (default: eval)")
    compare.set_defaults(run=_compare)

    export = commands.add_parser("export", parents=[model, names, shape], help="the taps as one ONNX, torch.export or TorchScript file")
    export.add_argument("--format", required=True, choices=("onnx", "pt2", "torchscript"), help="the file format")
    export.add_argument("-o", "--output", required=True, metavar="PATH", help="the file to write (its folder must exist)")
    export.set_defaults(run=_export)

    extract = commands.add_parser("extract", parents=[model, names, mode], help="features of every image in a folder, to disk")
    extract.add_argument("--data", metavar="DIR", help="image folder, searched recursively (png, jpg, jpeg, webp, bmp)")
    extract.add_argument("--text", metavar="FILE", help="instead of --data: a UTF-8 text file, one example per non-empty line")
    extract.add_argument("--tokenizer", metavar="DIR", help="with --text: a local Hugging Face tokenizer folder (default: an hf:PATH model's)")
    extract.add_argument("--max-length", type=_positive, default=128, metavar="N", help="with --text: tokens per line at most (default 128)")
    extract.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="where the shards and manifest.json go")
    extract.add_argument("--batch-size", type=_positive, default=32, metavar="N", help="images per forward (default 32)")
    extract.add_argument("--image-size", type=_positive, metavar="S", help="crop size (default: the model's own, e.g. 224)")
    extract.add_argument(
        "--pool", choices=("avg", "max", "cls", "mean_tokens", "none"), default="avg",
        help="feature maps and tokens to one vector per image: avg or max over the spatial dims or tokens, cls (token 0), none (default avg)",
    )  # fmt: skip
    extract.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="autocast dtype (float16 on CUDA only; default: none)")
    extract.add_argument("--out-dtype", choices=("float32", "bfloat16", "float16"), help="dtype of the stored features (default: as computed)")
    extract.add_argument("--limit", type=_positive, metavar="N", help="only the first N images, in sorted order")
    extract.add_argument("--shard-size", type=_positive, default=256, metavar="N", help="images per shard file; Ctrl-C keeps finished shards (default 256)")
    extract.add_argument("--workers", type=int, default=0, metavar="N", help="image-decoding processes (default 0)")
    extract.add_argument("--device", default="cpu", help="torch device (default cpu; under torchrun, cuda means cuda:LOCAL_RANK)")
    extract.add_argument("--quiet", action="store_true", help="no progress bar")
    extract.set_defaults(run=_extract)
    return parser


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, like 1,3,224,224, not {text!r}")
    return shape


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}")
    return int(text)


def _device_of_rank(device: str) -> str:
    return f"cuda:{os.environ['LOCAL_RANK']}" if device == "cuda" and "LOCAL_RANK" in os.environ else device
