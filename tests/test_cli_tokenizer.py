"""The `gptstack tokenizer` commands, run as a user runs them: exit codes, stderr, files on disk."""
import re
import subprocess
import sys

import pytest

from gptstack.cli import build_parser
from gptstack.tokenizer import Tokenizer


def gptstack(*args, stdin: str = "", check: bool = False):
    proc = subprocess.run([sys.executable, "-m", "gptstack.cli", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, real_texts):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(real_texts["tinyshakespeare"][:200_000], encoding="utf-8")
    return path


def test_train_encode_decode(corpus, tmp_path):
    out = tmp_path / "tok"
    proc = gptstack("tokenizer", "train", "--input", corpus, "--vocab-size", 600, "--out", out, "--pattern", "digits", check=True)
    assert "trained 600 tokens" in proc.stderr
    tok = Tokenizer.load(out)
    assert tok.vocab_size == 600 and tok.pattern_name == "digits"
    text = "Hello <|bos|> world, 2024!\n"
    ids = gptstack("tokenizer", "encode", "--tokenizer", out, stdin=text, check=True).stdout.split()
    assert [int(i) for i in ids] == tok.encode(text)
    assert gptstack("tokenizer", "decode", "--tokenizer", out, stdin=" ".join(ids), check=True).stdout == text
    shown = gptstack("tokenizer", "show", "--tokenizer", out, "--color", "never", stdin="ab cd", check=True).stdout
    assert shown.splitlines()[1].replace("|", "") == "ab cd"


def test_every_command_has_help():
    parser = build_parser()
    commands = [[]]
    for action in parser._subparsers._group_actions:
        for name, sub in action.choices.items():
            commands.append([name])
            if sub._subparsers:
                for sub_action in sub._subparsers._group_actions:
                    commands += [[name, child] for child in sub_action.choices]
    assert ["tokenizer", "train"] in commands
    for cmd in commands:
        proc = gptstack(*cmd, "--help")
        assert proc.returncode == 0 and "usage: gptstack" in proc.stdout, cmd


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make_input, extra, message",
    [
        (lambda d: d / "missing.txt", [], "missing.txt: file not found"),
        (lambda d: _write(d / "empty.txt", b"  \n"), [], "empty.txt: file is empty"),
        (lambda d: _write(d / "latin1.txt", b"ok line\nsecond line caf\xe9\n"), [], r"latin1.txt:2: byte 0xe9 at offset 23 is not valid UTF-8"),
        (lambda d: _write(d / "ok.txt", b"hello world"), ["--vocab-size", "200"], "--vocab-size: 200 is too small, expected at least 262"),
        (lambda d: _write(d / "ok.txt", b"hello world"), ["--pattern", "(unclosed"], "pattern: invalid regex"),
        (lambda d: d, [], "is a directory"),
    ],
)
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, make_input, extra, message):
    path = make_input(tmp_path)
    out = tmp_path / "out"
    args = ["tokenizer", "train", "--input", path, "--vocab-size", "300", "--out", out]
    proc = gptstack(*args, *extra)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists()


def test_failed_retrain_keeps_existing_tokenizer(corpus, tmp_path):
    out = tmp_path / "tok"
    gptstack("tokenizer", "train", "--input", corpus, "--vocab-size", 400, "--out", out, check=True)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    proc = gptstack("tokenizer", "train", "--input", corpus, tmp_path / "bad.txt", "--vocab-size", 500, "--out", out)
    assert proc.returncode == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_decode_rejects_bad_ids(corpus, tmp_path):
    out = tmp_path / "tok"
    gptstack("tokenizer", "train", "--input", corpus, "--vocab-size", 300, "--out", out, check=True)
    proc = gptstack("tokenizer", "decode", "--tokenizer", out, stdin="1 2 x")
    assert proc.returncode == 2 and "item 3: expected a token id" in proc.stderr
    proc = gptstack("tokenizer", "decode", "--tokenizer", out, stdin="1 99999")
    assert proc.returncode == 2 and "token id 99999 is out of range" in proc.stderr
    proc = gptstack("tokenizer", "encode", "--tokenizer", tmp_path / "nothing", stdin="x")
    assert proc.returncode == 2 and "no tokenizer here" in proc.stderr
