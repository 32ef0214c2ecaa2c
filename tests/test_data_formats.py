"""Data readers: every format users bring, the real files in ../shared/data, and bad input."""
import gzip
import json
import re
import sys

import pytest

from gptstack.common import UserError
from gptstack.data.formats import check_answer, extract_final_answer, parse_transcript, read_dataset

HH = "hh-rlhf/helpful-base/test.jsonl.gz"
GSM = "gsm8k/train.jsonl"
SEEDS = "instructions/seed_tasks.jsonl"


def write_jsonl(path, rows, gz=False):
    data = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


# --- the real files ---------------------------------------------------------------------------


def test_hh_rlhf_helpful_base_test(shared_data):
    ds = read_dataset(shared_data / HH)
    assert (ds.kind, ds.source, ds.n_rows) == ("preference", "hh-rlhf", 2354)
    # Irregular rows of the real release are skipped and counted by reason, never silently.
    assert ds.usable + ds.n_skipped == 2354 and len(ds.rows) == ds.usable
    assert ds.skipped == {"same role twice in a row": 15, "empty final assistant turn": 3,
                          "chosen equals rejected": 2, "empty turn": 1}
    for row in ds.rows:
        assert row["prompt"][-1]["role"] == "user" and row["chosen"] and row["rejected"]
        assert row["chosen"] != row["rejected"]
        roles = [m["role"] for m in row["prompt"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"]
    first = ds.rows[0]
    assert first["prompt"] == [{"role": "user", "content": "Do you know why turkeys became the official food of thanksgiving?"}]
    assert first["chosen"].startswith("To be honest, I don’t know")
    assert ds.summary()["data/skipped/same_role_twice_in_a_row"] == 15
    assert re.fullmatch(r".*test\.jsonl\.gz: preference, 2354 rows \(2333 usable, 21 skipped: same role twice in a row ×15, "
                        r"empty final assistant turn ×3, chosen equals rejected ×2, empty turn ×1\) \[hh-rlhf\]", ds.describe())


def test_gsm8k_train(shared_data):
    ds = read_dataset(shared_data / GSM, expect="verifiable")
    assert (ds.kind, ds.source, ds.n_rows, ds.usable, ds.n_skipped) == ("verifiable", "gsm8k", 7473, 7473, 0)
    for row in ds.rows:
        float(row["answer"])  # every answer is a number
        assert "<<" not in row["solution"] and row["solution"].endswith(f"The answer is {row['answer']}.")
        assert check_answer(row["solution"], row["answer"])
    assert ds.rows[0]["answer"] == "72"
    assert any(r["answer"] == "1080" for r in ds.rows)   # "#### 1,080" loses its comma
    assert len(ds.as_sft()) == 7473 and ds.as_sft()[0][-1]["role"] == "assistant"


def test_self_instruct_seeds(shared_data):
    ds = read_dataset(shared_data / SEEDS, expect="sft")
    assert (ds.kind, ds.source, ds.n_rows, ds.usable, len(ds.rows)) == ("sft", "self-instruct", 175, 175, 175)
    raw = [json.loads(line) for line in (shared_data / SEEDS).read_text().splitlines()]
    for row, task in zip(ds.rows, raw):
        user, assistant = row["messages"]
        assert user["content"].startswith(task["instruction"].strip())
        inp = task["instances"][0]["input"].strip()
        assert (inp in user["content"]) and (not inp or user["content"].endswith(inp))
        assert assistant == {"role": "assistant", "content": task["instances"][0]["output"].strip()}


def _corrupt(src_lines: list[bytes], line: int, how: str) -> list[bytes]:
    lines = list(src_lines)
    if how == "truncate":
        lines[line - 1] = lines[line - 1][: len(lines[line - 1]) // 2]
    elif how == "latin1":
        lines[line - 1] = lines[line - 1][:20] + b"\xe9" + lines[line - 1][20:]
    return lines


@pytest.mark.parametrize("name, line, how, message", [
    (HH, 5, "truncate", r":5: json: expected one JSON object per line"),
    (HH, 2000, "latin1", r":2000: bytes: expected UTF-8 text \(byte 0xe9 at column 21\)"),
    (GSM, 10, "drop-answer", r":10: answer: missing, expected a string"),
    (GSM, 7000, "bad-final", r":7000: answer: expected a solution ending in '#### <number>'"),
    (SEEDS, 3, "truncate", r":3: json: expected one JSON object per line"),
    (SEEDS, 100, "drop-output", r":100: instances\[0\]\.output: missing, expected a string"),
])
def test_corrupted_copies_are_rejected_with_file_and_line(shared_data, tmp_path, name, line, how, message):
    src = shared_data / name
    raw = gzip.decompress(src.read_bytes()) if name.endswith(".gz") else src.read_bytes()
    lines = raw.split(b"\n")
    if how in ("truncate", "latin1"):
        lines = _corrupt(lines, line, how)
    else:
        row = json.loads(lines[line - 1])
        if how == "drop-answer":
            del row["answer"]
        elif how == "bad-final":
            row["answer"] = row["answer"].replace("####", "The total is")
        else:
            del row["instances"][0]["output"]
        lines[line - 1] = json.dumps(row).encode()
    data = b"\n".join(lines)
    dst = tmp_path / src.name
    dst.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    with pytest.raises(UserError) as e:
        read_dataset(dst)
    text = str(e.value)
    assert re.search(re.escape(str(dst)) + message, text), text
    assert "1 bad row" in text and "--skip-bad-rows" in text
    ds = read_dataset(dst, skip_bad_rows=True)
    assert ds.skipped["bad row"] == 1 and len(ds.errors) == 1 and ds.summary()["data/skipped/bad_row"] == 1


# --- every format --------------------------------------------------------------------------------


def test_trl_standard_and_conversational_forms(tmp_path):
    user = lambda c: {"role": "user", "content": c}  # noqa: E731
    bot = lambda c: {"role": "assistant", "content": c}  # noqa: E731
    cases = [
        ({"text": "The sky is blue."}, "text", {"text": "The sky is blue."}),
        ({"messages": [{"role": "system", "content": "Be brief."}, user("Hi"), bot("Hello.")]}, "sft",
         {"messages": [{"role": "system", "content": "Be brief."}, user("Hi"), bot("Hello.")]}),
        ({"prompt": "The sky is", "completion": " blue."}, "sft", {"messages": [user("The sky is"), bot("blue.")]}),
        ({"prompt": [user("What color is the sky?")], "completion": [bot("It is blue.")]}, "sft",
         {"messages": [user("What color is the sky?"), bot("It is blue.")]}),
        ({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}, "preference",
         {"prompt": [user("The sky is")], "chosen": "blue.", "rejected": "green."}),
        ({"prompt": [user("What color is the sky?")], "chosen": [bot("It is blue.")], "rejected": [bot("It is green.")]},
         "preference", {"prompt": [user("What color is the sky?")], "chosen": "It is blue.", "rejected": "It is green."}),
        ({"chosen": [user("What color is the sky?"), bot("It is blue.")],
          "rejected": [user("What color is the sky?"), bot("It is green.")]}, "preference",
         {"prompt": [user("What color is the sky?")], "chosen": "It is blue.", "rejected": "It is green."}),
        ({"chosen": "The sky is blue.", "rejected": "The sky is green."}, "preference",
         {"prompt": [user("The sky is")], "chosen": "blue.", "rejected": "green."}),
        ({"prompt": "The sky is"}, "prompt", {"prompt": [user("The sky is")]}),
        ({"prompt": [user("What color is the sky?")]}, "prompt", {"prompt": [user("What color is the sky?")]}),
        ({"prompt": "2 + 2?", "answer": 4}, "verifiable", {"prompt": [user("2 + 2?")], "answer": "4"}),
        ({"question": "Tom has 3 apples and buys 2. How many?", "answer": "3+2=<<3+2=5>>5\n#### 5"}, "verifiable",
         {"prompt": [user("Tom has 3 apples and buys 2. How many?")], "answer": "5", "solution": "3+2=5\nThe answer is 5."}),
        ({"instruction": "Add.", "input": "2 and 3", "output": "5"}, "sft",
         {"messages": [user("Add.\n\n2 and 3"), bot("5")]}),
        ({"prompt": "What is 2 + 3?", "reference": "2 + 3 = 5.\nThe answer is 5.", "family": "arithmetic"}, "sft",
         {"messages": [user("What is 2 + 3?"), bot("2 + 3 = 5.\nThe answer is 5.")]}),
        ({"prompt": "Pick", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]}, "ranking",
         {"prompt": [user("Pick")], "responses": ["a", "b", "c"], "ranking": [2, 0, 1]}),
    ]
    for k, (row, kind, normalised) in enumerate(cases):
        for ext, gz in ((".jsonl", False), (".jsonl.gz", True)):
            ds = read_dataset(write_jsonl(tmp_path / f"case{k}{ext}", [row, row], gz=gz))
            assert ds.kind == kind and ds.rows == [normalised] * 2 and ds.usable == 2, (row, ds.rows)
        # a JSON array works too, with or without .gz
        path = tmp_path / f"case{k}.json"
        path.write_text(json.dumps([row, row], indent=2))
        assert read_dataset(path).rows == [normalised] * 2


def test_prefs_convert_to_sft_and_prompts(tmp_path):
    rows = [{"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."}]
    ds = read_dataset(write_jsonl(tmp_path / "p.jsonl", rows), expect=("preference", "ranking"))
    assert ds.as_sft() == [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]]
    assert ds.prompts() == [[{"role": "user", "content": "Hi"}]]
    with pytest.raises(UserError, match=r"p.jsonl: expected sft data, found preference rows"):
        read_dataset(tmp_path / "p.jsonl", expect="sft")


def test_irregular_rows_are_skipped_and_counted_by_reason(tmp_path):
    good = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: What?"}
    rows = [
        good,
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant:"},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Yo\n\nAssistant: What?"},
        {"chosen": "\n\nHuman: Hi\n\nHuman: Hi again\n\nAssistant: Hello!",
         "rejected": "\n\nHuman: Hi\n\nHuman: Hi again\n\nAssistant: What?"},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!"},
        good,
    ]
    ds = read_dataset(write_jsonl(tmp_path / "hh.jsonl.gz", rows, gz=True))
    assert ds.source == "hh-rlhf" and ds.n_rows == 6 and ds.usable == 2
    assert ds.skipped == {"empty final assistant turn": 1, "chosen and rejected have different prompts": 1,
                          "same role twice in a row": 1, "chosen equals rejected": 1}
    assert ds.rows[0] == {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "What?"}
    msgs = [{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]},
            {"messages": [{"role": "user", "content": "a"}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    # a conversation written for fine-tuning is held to the format: each problem is a file:line error
    with pytest.raises(UserError) as e:
        read_dataset(write_jsonl(tmp_path / "m.jsonl", msgs))
    assert "m.jsonl:1: messages[1]: same role twice in a row" in str(e.value)
    assert "m.jsonl:2: messages[1]: empty final assistant turn; expected non-empty content" in str(e.value)
    assert "m.jsonl:3: messages[0]: does not end with an assistant turn" in str(e.value)
    ds = read_dataset(tmp_path / "m.jsonl", skip_bad_rows=True)
    assert ds.usable == 1 and ds.skipped == {"bad row": 3}


def test_transcript_parsing():
    assert parse_transcript("\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHuman: Bye\n\nAssistant:") == [
        {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": ""}]
    assert parse_transcript("Human: a\n\nAssistant: b")[0] == {"role": "user", "content": "a"}


def test_structural_errors_are_all_listed_with_line_and_key(tmp_path):
    path = tmp_path / "prefs.jsonl"
    lines = [
        json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}),
        '{"prompt": "a", "chosen": "b", "rej',                          # 2: truncated
        json.dumps({"prompt": "a", "chosen": "b"}),                      # 3: missing key
        "",                                                               # blank lines are not rows
        json.dumps({"prompt": "a", "chosen": 5, "rejected": "c"}),        # 5: wrong type
        json.dumps(["not", "an", "object"]),                              # 6
        json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}),
    ]
    latin1 = b'{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}'             # 8: not UTF-8
    data = "\n".join(lines).encode() + b"\n" + latin1
    path.write_bytes(data)
    with pytest.raises(UserError) as e:
        read_dataset(path)
    head, *got = str(e.value).splitlines()
    assert head.startswith(f"{path}: 5 bad rows") and "--skip-bad-rows" in head
    assert got == [  # every bad line, in line order
        f"{path}:2: json: expected one JSON object per line: Unterminated string starting at (column 32)",
        f"{path}:3: rejected: missing, expected a string or a list of {{role, content}} messages",
        f"{path}:5: chosen: expected a string or a list of {{role, content}} messages, got a number",
        f"{path}:6: row: expected a JSON object, got a list",
        f"{path}:8: bytes: expected UTF-8 text (byte 0xe9 at column 16)",
    ]
    ds = read_dataset(path, skip_bad_rows=True)
    assert (ds.n_rows, ds.usable, ds.skipped["bad row"]) == (7, 2, 5)


def test_json_array_errors_carry_line_numbers(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": 3},\n  {"text": "b"}\n]\n')
    with pytest.raises(UserError, match=re.escape(f"{path}:3: text: expected a string, got a number")):
        read_dataset(path)
    path.write_text('[\n  {"text": "a"},\n  {"text": "b",\n')
    with pytest.raises(UserError, match=re.escape(f"{path}:4: json:")):
        read_dataset(path)


@pytest.mark.parametrize("content, message", [
    (b"", r"no data"),
    (b'{"foo": 1}\n', r":1: keys foo: expected the keys of a known format"),
    (b"not gzip", r"not a valid gzip file"),
    (b'{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}\n', r":1: ranking: expected a permutation of 0..1"),
    (b'{"prompt": "p", "responses": ["a"], "ranking": [0]}\n', r":1: responses: expected a list of at least 2 strings"),
])
def test_file_level_problems(tmp_path, content, message):
    name = "x.jsonl.gz" if content == b"not gzip" else "x.jsonl"
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_dataset(path)
    with pytest.raises(UserError, match="file not found"):
        read_dataset(tmp_path / "missing.jsonl")


def test_answer_checker():
    assert extract_final_answer("so 3 + 4 = 7.\nThe answer is 7.") == "7"
    assert extract_final_answer("blah\n#### 1,080") == "1080"
    assert extract_final_answer("I get 12 then 15") == "15"
    assert extract_final_answer("The answer is: $18.50") == "18.50"
    assert extract_final_answer("no digits") is None
    assert check_answer("The answer is 1,080.", "1080") and check_answer("#### 18.5", "18.50")
    assert not check_answer("The answer is 7. Later I said 8", "8")
    assert not check_answer("nothing", "3")


# --- parquet files and `datasets` save_to_disk folders (the datasets extra) -------------------------

USER, BOT = {"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "The answer is 5."}
TABLE_FORMATS = {
    "messages": [{"messages": [USER, BOT]},
                 {"messages": [{"role": "system", "content": "Be brief."}, USER, BOT, {"role": "user", "content": "And 4 + 4?"},
                               {"role": "assistant", "content": "8"}]}],
    "prompt-completion": [{"prompt": "Say hi.", "completion": "hi"}, {"prompt": "Say yo.", "completion": "yo"},
                          {"prompt": "Say nothing.", "completion": " "}],              # irregular: counted alike
    "preference": [{"prompt": "Pick.", "chosen": "A", "rejected": "B"}, {"prompt": "Pick.", "chosen": "C", "rejected": "C"}],
    "ranking": [{"prompt": "Rank.", "responses": ["a", "b", "c"], "ranking": [2, 0, 1], "gold": [0.5, 0.1, 0.9]}],
    "stepwise": [{"prompt": "2 + 3 + 4?", "completions": ["2 + 3 = 5", "5 + 4 = 9"], "labels": [True, False]},
                 {"prompt": "1 + 1?", "completions": ["1 + 1 = 2"], "labels": [True]}],
    "gsm8k": [{"question": "How many?", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"}],
    # the second row has no "input": the table holds a null there, read as the absent key it is in JSONL
    "alpaca": [{"instruction": "Add.", "input": "2 and 3", "output": "5"}, {"instruction": "Say hi.", "output": "hi"}],
}


def write_tables(tmp_path, rows):
    """The same rows as JSONL, parquet, a save_to_disk Dataset folder and a DatasetDict folder."""
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "rows.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"test": table.select([0]), "train": table}).save_to_disk(str(tmp_path / "dict"))
    return write_jsonl(tmp_path / "rows.jsonl", rows), tmp_path / "rows.parquet", tmp_path / "saved", tmp_path / "dict"


@pytest.mark.parametrize("name", TABLE_FORMATS)
def test_parquet_and_save_to_disk_read_as_the_jsonl_of_the_same_rows(tmp_path, name):
    jsonl, *tables = write_tables(tmp_path, TABLE_FORMATS[name])
    want = read_dataset(jsonl)
    for path in tables:
        got = read_dataset(path)
        assert (got.kind, got.source, got.rows, got.lines, got.n_rows, got.usable, got.skipped) == \
               (want.kind, want.source, want.rows, want.lines, want.n_rows, want.usable, want.skipped), path
        assert got.describe() == want.describe().replace(str(jsonl), str(path))


def test_parquet_bad_rows_name_file_and_row_and_data_check_reads_tables(tmp_path, capsys):
    from gptstack.cli import main

    rows = [{"messages": [USER, BOT]}, {"messages": [USER, {"role": "robot", "content": "beep"}]},
            {"messages": [USER, BOT]}, {"messages": [USER, {"role": "user", "content": "again"}]}]
    jsonl, parquet, saved, dictionary = write_tables(tmp_path, rows)
    for path in (parquet, saved, dictionary):
        with pytest.raises(UserError) as e:
            read_dataset(path)
        assert str(e.value).splitlines()[1:] == [
            f"{path}:2: messages[1].role: expected one of system, user, assistant, got 'robot'",
            f"{path}:4: messages[1]: same role twice in a row; expected user and assistant turns to alternate"]
        ds = read_dataset(path, skip_bad_rows=True)
        assert (ds.usable, ds.skipped, ds.lines) == (2, {"bad row": 2}, [1, 3])
    assert main(["data", "check", "--json", str(jsonl), str(parquet), str(saved)]) == 2
    reports = json.loads(capsys.readouterr().out)
    assert [r["errors"] for r in reports[1:]] == [[e.replace(str(jsonl), str(p)) for e in reports[0]["errors"]]
                                                  for p in (parquet, saved)]
    write_tables(tmp_path, TABLE_FORMATS["prompt-completion"])
    assert main(["data", "check", str(parquet), str(saved)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{parquet}: sft, 3 rows (2 usable, 1 skipped: empty final assistant turn ×1) [trl]",
                   f"{saved}: sft, 3 rows (2 usable, 1 skipped: empty final assistant turn ×1) [trl]"]


def test_table_folders_without_a_train_split_or_marker_files_are_refused(tmp_path):
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_list(TABLE_FORMATS["prompt-completion"][:2])
    datasets.DatasetDict({"validation": table, "test": table}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(UserError) as e:
        read_dataset(tmp_path / "dict")
    assert str(e.value) == (f"{tmp_path / 'dict'}: a DatasetDict with the splits validation, test and no train split; "
                            f"expected a train split, or pass one split's folder ({tmp_path / 'dict' / 'validation'})")
    assert read_dataset(tmp_path / "dict" / "test").usable == 2   # one split's folder is a Dataset folder
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="plain: is a directory, expected a data file"):
        read_dataset(tmp_path / "plain")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match=r"broken\.parquet: not a valid parquet file"):
        read_dataset(tmp_path / "broken.parquet")


def test_tables_without_the_datasets_extra_say_how_to_install_it(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    _, parquet, saved, _ = write_tables(tmp_path, TABLE_FORMATS["gsm8k"])
    for module in ("datasets", "pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, module, None)   # import raises ImportError, as when not installed
    with pytest.raises(UserError) as e:
        read_dataset(parquet)
    assert str(e.value) == f"{parquet}: reading parquet needs the datasets extra: pip install 'gptstack[datasets]'"
    with pytest.raises(UserError) as e:
        read_dataset(saved)
    assert str(e.value) == (f"{saved}: reading a datasets save_to_disk folder needs the datasets extra: "
                            "pip install 'gptstack[datasets]'")
