"""The bad-input corpus (tests/data/bad, see its README.md) through every command that reads a
user's file: `data check`, `sft --data`, `rm --prefs`, `dpo --prefs`, `grpo --reward FILE` and
`tokenizer train --input`. For each (file, command): exit status 0 (with a counted `warning:`
naming the file where the table says so) or 2 with an `error:` naming the file (and file:line
where a line applies) as the verdict on stderr; never a traceback; on exit 2 nothing written.

Everything runs in-process through `gptstack.cli.main` on one random-weight micro run. A stage
that accepts its file is stopped where its work would start (its `resume_state`, after every
check of the data): the data path is tested to the end, and nothing is trained.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptstack.cli import main
from gptstack.config import build_config
from gptstack.data.formats import read_dataset
from gptstack.model import GPT
from gptstack.stages import dpo, ppo, rm, sft
from gptstack.tokenizer import ASSISTANT_START, DEFAULT_SPECIALS, Tokenizer
from gptstack.rundir import save_model
from gptstack.train.sources import Prompts

BAD = Path(__file__).resolve().parent / "data" / "bad"
REPO = Path(__file__).resolve().parents[1]
BLOCK = 128  # the micro run's context: long_prompt*.jsonl do not fit it
COMMANDS = ("data", "sft", "rm", "dpo", "grpo", "tokenizer")
STAGES = {"sft": sft, "rm": rm, "dpo": dpo, "grpo": ppo}

OK, WARN = "ok", "warn"          # exit 0: nothing to say / a counted warning naming the file
VERIFIABLE = "expected verifiable data, found"   # grpo --reward FILE wants question/answer rows
PREFERENCE = "expected preference or ranking data, found"
NOT_UTF8 = "is not valid UTF-8"  # tokenizer train (common.read_text_file)


def case(what: str, data=OK, tok=OK, **per_command) -> tuple[str, dict]:
    """A file's case and its outcome per command: `data` for the five data readers unless
    overridden; an error is the text the verdict must hold (":N: key" = right after the file name)."""
    out = {c: data for c in ("data", "sft", "rm", "dpo", "grpo")}
    out.update(per_command, tokenizer=tok)
    return what, out


def prefs_ok(what: str, **kw):  # a preference/ranking file every reader takes (grpo wants answers)
    return case(what, grpo=VERIFIABLE, **kw)


def row_error(what: str, error: str, kind: str = "preference", **kw):
    """A structural error in a row: every reader names file:line: key, but a reader that wants
    another kind refuses the file for its kind first."""
    wrong = {"preference": {"grpo": VERIFIABLE}, "ranking": {"grpo": VERIFIABLE},
             "sft": {"rm": PREFERENCE, "dpo": PREFERENCE, "grpo": VERIFIABLE},
             "verifiable": {"rm": PREFERENCE, "dpo": PREFERENCE}, "none": {}}[kind]
    return case(what, error, **{**wrong, **kw})


CASES = {
    # --- whole files
    "empty.jsonl": case("empty file (0 bytes)", "no data", tok="file is empty"),
    "whitespace_only.jsonl": case("spaces, tabs and CRLF blank lines only", "no data", tok="file is empty"),
    "empty_array.json": case("a JSON array with no items", "no data"),
    "empty.txt": case("empty text file", "no data", tok="file is empty"),
    "dir.jsonl": case("a directory named like a data file", "is a directory", rm="no prefs.jsonl",
                      dpo="no prefs.jsonl", tok="is a directory"),
    "truncated.jsonl.gz": case("gzip cut short (first 60 bytes)", "not a valid gzip file", tok=NOT_UTF8),
    "not_gzip.jsonl.gz": case("plain JSONL named .gz", "not a valid gzip file"),
    "empty.jsonl.gz": case("gzip of nothing", "no data", tok=NOT_UTF8),
    "gz_bad_line.jsonl.gz": row_error("gzipped JSONL, line 3 truncated", ":3: json:", tok=NOT_UTF8),
    "latin1.jsonl": row_error("Latin-1 byte 0xe9 on line 2", ":2: bytes: expected UTF-8", tok=":2: byte 0xe9"),
    "latin1.txt": case("Latin-1 text file", ":2: bytes: expected UTF-8", tok=":2: byte 0xe9"),
    "bom.jsonl": prefs_ok("UTF-8 BOM before JSONL"),
    "bom_array.json": case("UTF-8 BOM before a pretty-printed JSON array (GSM8K)", rm=PREFERENCE, dpo=PREFERENCE),
    "crlf.jsonl": prefs_ok("CRLF line ends"),
    "cr_only.jsonl": case("old-Mac CR-only line ends: one line of several objects", ":1: json: expected one "
                          "JSON object per line: Extra data"),
    "blank_lines.jsonl": prefs_ok("blank lines between and after rows"),
    # --- JSON syntax
    "not_json.jsonl": case("plain text, not JSON (2 bad lines)", ":1: json:"),
    "truncated_line.jsonl": row_error("last line cut mid-string", ":4: json:"),
    "trailing_comma_object.jsonl": case("trailing comma inside an object", ":1: json:"),
    "single_quotes.jsonl": case("Python dict syntax (single quotes)", ":1: json:"),
    "trailing_comma.json": row_error("JSON array with a trailing comma", ":5: json: expected a value after ','"),
    "missing_comma.json": row_error("JSON array items without a comma", ":3: json: expected ',' or ']'"),
    "unclosed_array.json": row_error("JSON array never closed", ":5: json: expected ']'"),
    "text_after_array.json": row_error("text after the closing ]", ":3: json: expected nothing after"),
    "deep_nested.jsonl": row_error("100000 nested [ on line 2 (RecursionError in json.loads)",
                                   ":2: json: nested too deeply"),
    "deep_nested.json": row_error("JSON array whose 2nd item nests 100000 [", ":3: json: nested too deeply"),
    "nul_byte.jsonl": case("a raw NUL byte inside a JSON string", ":1: json: expected one JSON object per line: "
                           "Invalid control character"),
    "nul_escape.jsonl": prefs_ok("\\u0000 escapes in prompts: valid JSON text, kept"),
    "lone_surrogate.jsonl": row_error("a lone \\ud800 escape in chosen", ":3: chosen: a lone UTF-16 surrogate"),
    "lone_surrogate_messages.jsonl": row_error("a lone \\udc00 escape in a message", ":1: messages[0].content: a "
                                               "lone UTF-16 surrogate", kind="none"),
    "surrogate_pair.jsonl": prefs_ok("a valid surrogate pair (emoji) escape"),
    "line_separator.jsonl": prefs_ok("raw U+2028/U+2029 inside strings (not line breaks in JSONL)"),
    # --- structure
    "top_level_scalar.json": case("a bare number", ":1: row: expected a JSON object, got a number"),
    "top_level_strings.jsonl": case("JSONL of strings (3 bad lines)", ":1: row: expected a JSON object"),
    "array_of_non_objects.json": case("JSON array of a number, a string and null",
                                      ":1: row: expected a JSON object"),
    "array_of_arrays.jsonl": case("each line a list holding the object", ":1: row: expected a JSON object, "
                                  "got a list"),
    "empty_object.jsonl": case("{}", ":1: keys (none): expected the keys of a known format"),
    "wrong_keys.jsonl": case("unknown keys input/response", ":1: keys input, response"),
    "mixed_formats.jsonl": row_error("preference rows, then a messages row", ":3: chosen: missing"),
    "number_for_string.jsonl": row_error("a number as the prompt", ":1: prompt: expected a string or a list"),
    "null_value.jsonl": row_error("null as chosen", ":1: chosen: expected a string or a list of {role, content} "
                                  "messages, got null"),
    "duplicate_keys.jsonl": row_error("chosen twice in one object", ":2: chosen: the same key twice"),
    "kto_label.jsonl": case("TRL unpaired (KTO) rows: prompt + completion + label",
                            ":1: label: TRL's unpaired preference (KTO) rows"),
    "label_only.jsonl": case("rows with only a label", ":1: keys label"),
    "messages_bad_role.jsonl": row_error("role 'bot'", ":1: messages[1].role", kind="sft"),
    "messages_not_list.jsonl": row_error("messages as a string", ":1: messages: expected a list", kind="sft"),
    "gsm_bad_final.jsonl": row_error("GSM8K answer without '#### n'", ":2: answer: expected a solution ending "
                                     "in '#### <number>'", kind="verifiable"),
    "stepwise_nan_label.jsonl": case("stepwise labels holding NaN", ":1: labels[1]",
                                     sft="expected sft or preference or ranking or verifiable data, found",
                                     rm=PREFERENCE, dpo=PREFERENCE, grpo=VERIFIABLE),
    # --- meaning
    "chosen_equals_rejected.jsonl": prefs_ok("2 of 8 rows with chosen == rejected", data=WARN),
    "all_chosen_equals_rejected.jsonl": case("every row chosen == rejected", "no usable rows", grpo=VERIFIABLE),
    "hh_irregular.jsonl": prefs_ok("hh-rlhf transcripts, 2 with text before the first turn", data=WARN),
    "ranking_ok.jsonl": prefs_ok("K = 3 rankings with gold (the control)"),
    "ranking_nan_gold.jsonl": row_error("gold holding NaN", ":2: gold: expected finite numbers",
                                        kind="ranking"),
    "ranking_inf_gold.jsonl": row_error("gold holding 1e999 (infinity)", ":1: gold: expected finite numbers",
                                        kind="ranking"),
    "ranking_k1.jsonl": row_error("a ranking of K = 1 response", ":1: responses: expected a list of at least 2",
                                  kind="ranking"),
    "ranking_tie.jsonl": row_error("a tie in the ranking", ":1: ranking: expected a permutation", kind="ranking"),
    "prompt_answer_nan.jsonl": row_error("prompt + answer NaN", ":1: answer: expected a finite number",
                                         kind="verifiable"),
    "special_tokens.jsonl": case("<|bos|>, <|assistant_start|>, ... typed in user turns: plain text",
                                 rm=PREFERENCE, dpo=PREFERENCE, grpo=VERIFIABLE),
    "long_prompt.jsonl": case("GSM8K, one question longer than the context", sft=WARN, rm=PREFERENCE,
                              dpo=PREFERENCE, grpo=WARN),
    "all_long_prompts.jsonl": case("GSM8K, every question longer than the context",
                                   sft="no conversation fits the context", rm=PREFERENCE, dpo=PREFERENCE,
                                   grpo=":1: prompt: "),
    "long_prompt_prefs.jsonl": prefs_ok("preferences, one prompt longer than the context", sft=WARN, rm=WARN,
                                        dpo=WARN),
}


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory) -> Path:
    """RUN/tokenizer + a random-weight RUN/sft (the stages only read it), in a second."""
    run = tmp_path_factory.mktemp("micro")
    tok = Tokenizer.train("What is 2 + 3? The answer is 5. Please read this story. " * 40, 300, pattern="digits",
                          special_tokens=DEFAULT_SPECIALS, progress=False, num_workers=1)
    tok.save(run / "tokenizer")
    cfg = build_config("micro", sets=[f"model.vocab_size={tok.vocab_size}", "model.n_layer=1", "model.n_embd=16",
                                      f"model.block_size={BLOCK}"])
    torch.manual_seed(0)
    save_model(run / "sft", GPT(cfg.model).state_dict(), cfg.to_dict())
    return run


class Accepted(Exception):
    """Raised where a stage that accepted its data would start its work."""


def argv(command: str, path: Path, run: Path, out: Path) -> list[str]:
    src = str(run / "sft")
    return {
        "data": ["data", "check", str(path)],
        # the held-out slice is sft's own business (tests/test_sft.py); these files are too small for one
        "sft": ["sft", "--from", src, "--data", str(path), "--out", str(out), "--recipe", "micro",
                "--set", "sft.heldout_fraction=0"],
        "rm": ["rm", "--from", src, "--prefs", str(path), "--out", str(out), "--recipe", "micro",
               "--set", "rm.eval_fraction=0.5"],
        "dpo": ["dpo", "--policy", src, "--prefs", str(path), "--out", str(out), "--recipe", "micro"],
        "grpo": ["grpo", "--policy", src, "--reward", str(path), "--out", str(out), "--recipe", "micro"],
        "tokenizer": ["tokenizer", "train", "--input", str(path), "--vocab-size", "300", "--out", str(out),
                      "--workers", "1"],
    }[command]


def invoke(args: list[str], command: str, monkeypatch) -> int:
    if command in STAGES:
        def stop(*a, **k):
            raise Accepted
        monkeypatch.setattr(STAGES[command], "resume_state", stop)
    try:
        return main(args)
    except Accepted:
        return 0


def test_the_corpus_is_the_table():
    files = sorted(p.name for p in BAD.iterdir() if p.name != "README.md")
    assert files == sorted(CASES), "tests/data/bad and CASES disagree"
    assert len(files) >= 40
    readme = (BAD / "README.md").read_text(encoding="utf-8")
    missing = [name for name in CASES if f"`{name}`" not in readme]
    assert not missing, f"README.md does not describe {missing}"


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, command, micro_run, tmp_path, capsys, monkeypatch):
    what, outcomes = CASES[name]
    expected = outcomes[command]
    path = BAD / name
    out = tmp_path / "out"
    code = invoke(argv(command, path, micro_run, out), command, monkeypatch)
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "Traceback" not in text
    lines = captured.err.rstrip("\n").splitlines()
    warnings = [line for line in lines if line.startswith("warning:")]
    if expected in (OK, WARN):
        assert code == 0, f"{name} ({what}), {command}: expected exit 0, got {code}:\n{captured.err}"
        assert not any(line.startswith("error:") for line in lines), captured.err
        if expected == WARN:
            assert any(name in w and any(ch.isdigit() for ch in w) for w in warnings), \
                f"{name}, {command}: expected a counted warning naming the file:\n{captured.err}"
        else:
            assert not warnings, f"{name}, {command}: unexpected warning:\n{captured.err}"
        return
    assert code == 2, f"{name} ({what}), {command}: expected exit 2, got {code}:\n{text}"
    # The verdict is the last `error:` line; only a listing of the file's bad rows
    # (`file:line: key: expected`, when several are bad) may follow it.
    verdicts = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert verdicts, f"{name}, {command}: no error: line on stderr:\n{captured.err}"
    last = verdicts[-1]
    block = "\n".join(lines[last:])
    for line in lines[last + 1:]:
        assert line.startswith((f"{path}:", "... and")), \
            f"{name}, {command}: stderr goes on after the error:\n{captured.err}"
    assert name in lines[last], f"{name}, {command}: the error does not name the file:\n{lines[last]}"
    if command == "data":  # data check lists every bad line above its verdict
        block = captured.err
    if expected.startswith(":"):
        assert f"{name}{expected}" in block, f"{name}, {command}: expected {name}{expected!r} in\n{block}"
    else:
        assert expected in block, f"{name}, {command}: expected {expected!r} in\n{block}"
    assert not out.exists(), f"{name}, {command}: exit 2 but {out} was written"


def test_special_token_strings_in_user_text_stay_text(micro_run):
    """`<|assistant_start|>` typed by a user is characters, not the control token: the rendered
    conversation holds exactly the template's special tokens, and decodes back to the text."""
    tok = Tokenizer.load(micro_run / "tokenizer")
    conversations = read_dataset(BAD / "special_tokens.jsonl", expect="sft").as_sft()
    for messages in conversations:
        ids, _ = tok.render_conversation(messages)
        specials = [i for i in ids if i in set(tok.special_tokens.values())]
        # <|bos|> <|user_start|> <|user_end|> <|assistant_start|> <|assistant_end|>, once each
        assert len(specials) == 5 and ids.count(tok.special(ASSISTANT_START)) == 1
        assert messages[0]["content"] in tok.decode(ids)
        assert "<|assistant_start|>" in tok.decode(tok.encode(messages[0]["content"]))
        assert not set(tok.encode(messages[0]["content"])) & set(tok.special_tokens.values())


def test_grpo_keeps_prompts_whole(micro_run):
    """The prompt longer than the context is skipped, counted and named by line, never cut."""
    cfg = build_config("micro")
    cfg.model.block_size = BLOCK
    tok = Tokenizer.load(micro_run / "tokenizer")
    prompts = Prompts(cfg, cfg.grpo, str(BAD / "long_prompt.jsonl"), tok=tok, expect=("verifiable",))
    kept = prompts.items + prompts.heldout
    assert len(kept) == 7 and not any("story" in it.messages[-1]["content"] for it in kept)
    room = BLOCK + 1 - max(cfg.grpo.max_new_tokens, cfg.eval.max_new_tokens)  # held-out rows are sampled at eval's
    assert all(len(tok.render_prompt(it.messages)) <= room for it in kept)


def test_skip_bad_rows_counts_what_it_skips(micro_run, capsys):
    """--skip-bad-rows turns the structural errors of a file with good rows left into a count."""
    code = main(["data", "check", "--json", str(BAD / "deep_nested.jsonl")])
    report = json.loads(capsys.readouterr().out)[0]
    assert code == 2 and report["usable"] == 3 and report["skipped"] == {"bad row": 1}
    assert report["errors"][0].endswith("deep_nested.jsonl:2: json: nested too deeply to read (over "
                                        f"{sys.getrecursionlimit()} levels of [ and {{); expected rows of objects "
                                        "a few levels deep")
    ds = read_dataset(BAD / "ranking_nan_gold.jsonl", skip_bad_rows=True)
    assert (ds.usable, ds.skipped["bad row"], ds.lines) == (1, 1, [1])


def test_end_to_end_no_traceback_reaches_stderr(micro_run, tmp_path):
    """Two real processes: `data check` of the whole corpus at once, and `sft` on the nested file."""
    env_cmd = [sys.executable, "-m", "gptstack.cli"]
    files = [str(BAD / name) for name in sorted(CASES)]
    proc = subprocess.run([*env_cmd, "data", "check", *files], capture_output=True, text=True, cwd=REPO, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert sum(line.startswith("error:") for line in proc.stderr.splitlines()) >= 40
    proc = subprocess.run([*env_cmd, "sft", "--from", str(micro_run / "sft"), "--data", str(BAD / "deep_nested.jsonl"),
                           "--out", str(tmp_path / "out"), "--recipe", "micro"],
                          capture_output=True, text=True, cwd=REPO, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(f"error: {BAD / 'deep_nested.jsonl'}:2: json: nested too deeply")
    assert not (tmp_path / "out").exists()
