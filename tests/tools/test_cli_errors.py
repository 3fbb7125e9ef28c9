"""Bad input to the ``fxtap`` command: one line on stderr, exit status 2, never a traceback, and no
output folder left behind; Ctrl-C during ``extract``: one line, exit status 130, and the same
command resumes. Real subprocesses where the behaviour is the process's."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.cli import IMAGES, console_script, fxtap_env
from torch import nn

import fxtap
from fxtap.cli import main


class Tokens(nn.Module):
    """A text model: token ids in, states out (a float input fails in the embedding)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids)


def tokens() -> nn.Module:
    return Tokens()


def sized(width: int, depth: int = 2) -> nn.Module:
    return nn.Linear(width, depth)


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if not line.startswith("fxtap: note:")]
    assert len(lines) == 1 and lines[0].startswith("fxtap: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tap", "resnet18", "layer1", "--weights", "{text}"], r"cannot read weights '.*notes.txt' \(\w+Error: .*--weights takes a state dict"),
        (["tap", "resnet18", "layer1", "--weights", "{foreign}"], r"cannot read weights '.*foreign.bin' \(\w+Error: .*--weights takes a state dict"),
        (["tap", "test_cli_errors:sized", "weight"], r"'test_cli_errors:sized' needs arguments \(width\): MODEL must be a factory that takes none"),
        (["tap", "test_cli_errors:tokens", "embed", "--input-shape", "2,5"], r"Tokens takes integer token ids, and got a random float32 input of shape 2,5 .*--input-dtype int64"),
    ],
)
def test_cli_bad_input_is_one_line_and_status_2(args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("these are not weights\n")
    (tmp_path / "foreign.bin").write_bytes(bytes(range(256)) * 4)
    args = [arg.format(text=tmp_path / "notes.txt", foreign=tmp_path / "foreign.bin") for arg in args]
    assert main(args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert re.search(message, line), line


def test_cli_text_model_with_integer_input_works(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tap", "test_cli_errors:tokens", "embed", "--input-shape", "2,5", "--input-dtype", "int64"]) == 0
    assert "(2, 5, 4)" in capsys.readouterr().out


@pytest.mark.parametrize(("device", "message"), [("gpu", "unknown device 'gpu': use cpu, cuda"), ("cuda", "no CUDA GPU that torch can use: use cpu")])
def test_cli_bad_device_leaves_no_output_folder(device: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "features"
    assert main(["extract", "resnet18", "layer1", "--data", str(IMAGES), "-o", str(out), "--device", device]) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_cli_messages_say_flags_not_python(capsys: pytest.CaptureFixture[str]) -> None:
    from fxtap.cli import _as_flags

    assert _as_flags('silence with mode="hooks" or train=True') == "silence with --mode hooks or --train"


def test_cli_factory_module_in_the_current_folder(tmp_path: Path) -> None:
    """The ``fxtap`` console script (unlike ``python -m``) has no current folder on sys.path by itself."""
    (tmp_path / "mymodels.py").write_text("import torch\n\ndef make():\n    return torch.nn.Linear(4, 2)\n")
    env = fxtap_env()
    result = subprocess.run([console_script(), "tap", "mymodels:make", "weight", "--input-shape", "1,4"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=180, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "weight  (2, 4)" in result.stdout
    missing = subprocess.run([console_script(), "tap", "nomodels:make", "weight"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=180, check=False)  # fmt: skip
    assert missing.returncode == 2
    assert "run fxtap from the folder that holds it, or add that folder to PYTHONPATH" in one_error_line(missing.stderr)


def test_cli_ctrl_c_during_extract_says_what_finished_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "features"
    args = ["extract", "test_extract:slow_net", "relu", "--data", str(IMAGES), "-o", str(out), "--image-size", "16"]
    args += ["--shard-size", "1", "--batch-size", "1", "--quiet"]
    # Ctrl-C from the first forward after shard 1 is on disk: a point fixed by the run's progress
    env = fxtap_env() | {"FXTAP_TEST_SIGNAL": f"INT:{out / 'shard-00001.safetensors'}"}
    proc = subprocess.Popen([sys.executable, "-m", "fxtap", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    finished = len(list(out.glob("shard-*.safetensors")))
    assert last == f"fxtap: interrupted: {finished} of 6 shards finished in {out}; run the same command again to resume"
    assert not list(out.glob(".*.tmp"))

    capsys.readouterr()
    assert main(args) == 0
    captured = capsys.readouterr()
    assert f"fxtap: resuming: kept {finished} of 6 shards finished by an earlier run in {out}" in captured.err
    assert f"6 shards ({6 - finished} computed, {finished} kept from an earlier run)" in captured.out


def test_cli_changed_image_content_recomputes_its_shard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "images"
    shutil.copytree(IMAGES, data)
    args = ["extract", "test_extract:slow_net", "conv", "--data", str(data), "-o", str(tmp_path / "out"), "--image-size", "8", "--shard-size", "2"]
    assert main(args) == 0
    target = data / "gradient.png"  # row 1: shard 0
    stat = target.stat()
    target.write_bytes((data / "shapes" / "circle.png").read_bytes())  # same name, new pixels
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    capsys.readouterr()
    assert main(args) == 0
    assert "3 shards (1 computed, 2 kept from an earlier run)" in capsys.readouterr().out
    features = fxtap.load_features(tmp_path / "out")
    assert torch.equal(features.tensors["conv"][1], features.tensors["conv"][features.files.index("shapes/circle.png")])


@pytest.fixture
def tiny_bert(tmp_path: Path) -> Path:
    """A one-layer BERT and a word-level tokenizer, saved to a local folder (built here, nothing downloaded)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "sat", "on", "mat", "a", "dog"]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / "bert"
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    transformers.BertModel(config).eval().save_pretrained(folder)
    return folder


def test_cli_extract_text_lines_with_a_local_tokenizer(tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = tmp_path / "lines.txt"
    lines.write_text("the cat sat\n\na dog sat on the mat\nthe mat\n")
    out = tmp_path / "out"
    args = ["extract", f"hf:{tiny_bert}", "embeddings", "--text", str(lines), "-o", str(out), "--pool", "mean_tokens", "--batch-size", "2", "--mode", "hooks"]
    assert main(args) == 0, capsys.readouterr().err
    assert "extracted 3 of 3 lines" in capsys.readouterr().out
    features = fxtap.load_features(out)
    assert features.files == [1, 3, 4]  # line numbers; the empty line 2 is no example
    from transformers import AutoModel, AutoTokenizer

    model, tokenizer = AutoModel.from_pretrained(tiny_bert).eval(), AutoTokenizer.from_pretrained(tiny_bert)
    for row, text in enumerate(["the cat sat", "a dog sat on the mat", "the mat"]):
        encoded = tokenizer([text], return_tensors="pt")
        with torch.no_grad():
            states = model.embeddings(input_ids=encoded["input_ids"], token_type_ids=encoded.get("token_type_ids"))
        torch.testing.assert_close(features.tensors["embeddings"][row], states[0].mean(dim=0), rtol=1e-4, atol=1e-5)


def test_cli_extract_text_without_a_tokenizer_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "lines.txt").write_text("hello\n")
    args = ["extract", "test_cli_errors:tokens", "embed", "--text", str(tmp_path / "lines.txt"), "-o", str(tmp_path / "out")]
    assert main(args) == 2
    assert "--text needs a tokenizer: give --tokenizer PATH" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
