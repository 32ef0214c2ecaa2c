"""`gptstack data check` and `gptstack world sample|score`, run as a user runs them."""
import json
import re
import subprocess
import sys

from gptstack import world


def gptstack(*args, stdin: str = ""):
    return subprocess.run([sys.executable, "-m", "gptstack.cli", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_data_check_names_every_bad_line(tmp_path):
    path = tmp_path / "prefs.jsonl"
    good = json.dumps({"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."}).encode()
    path.write_bytes(b"\n".join([
        good,
        good[:25],                                                            # 2: truncated line
        json.dumps({"prompt": "Hi", "chosen": "Hello."}).encode(),            # 3: missing key
        good,
        good.replace(b"Hello", b"H\xe9llo"),                                  # 5: non-UTF-8 byte
        good,
    ]) + b"\n")
    proc = gptstack("data", "check", path)
    assert proc.returncode == 2, proc.stderr
    assert f"{path}:2: json: expected one JSON object per line" in proc.stderr
    assert f"{path}:3: rejected: missing, expected a string" in proc.stderr
    assert f"{path}:5: bytes: expected UTF-8 text (byte 0xe9" in proc.stderr
    assert proc.stdout.strip() == f"{path}: preference, 6 rows (3 usable, 3 skipped: bad row ×3) [trl]"


def test_data_check_real_files_warns_about_irregular_rows(shared_data):
    hh = shared_data / "hh-rlhf/helpful-base/test.jsonl.gz"
    gsm = shared_data / "gsm8k/train.jsonl"
    seeds = shared_data / "instructions/seed_tasks.jsonl"
    proc = gptstack("data", "check", hh, gsm, seeds)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(re.escape(f"{hh}: preference, 2354 rows (2333 usable, 21 skipped: ") + r"same role twice in a row ×15, .*", lines[0])
    assert lines[1] == f"{gsm}: verifiable, 7473 rows (7473 usable, 0 skipped) [gsm8k]"
    assert lines[2] == f"{seeds}: sft, 175 rows (175 usable, 0 skipped) [self-instruct]"
    assert f"warning: {hh}: 21 irregular rows will be skipped" in proc.stderr
    report = json.loads(gptstack("data", "check", "--json", gsm).stdout)
    assert report[0]["rows"] == 7473 and report[0]["kind"] == "verifiable" and report[0]["errors"] == []


def test_data_check_unusable_file_is_one_error_and_the_rest_still_checked(tmp_path):
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps({"text": "hello"}) + "\n")
    proc = gptstack("data", "check", tmp_path / "missing.jsonl", ok)
    assert proc.returncode == 2
    assert f"error: {tmp_path / 'missing.jsonl'}: file not found" in proc.stderr
    assert proc.stdout.strip() == f"{ok}: text, 1 rows (1 usable, 0 skipped) [text]"


def test_world_sample_prints_jsonl():
    proc = gptstack("world", "sample", "--n", 25, "--seed", 3)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 25 and all(set(r) == {"prompt", "reference", "family"} for r in rows)
    assert {r["family"] for r in rows} == set(world.FAMILIES)
    assert [r["prompt"] for r in rows] == [t.prompt for t in world.train_tasks(25, seed=3)]
    assert gptstack("world", "sample", "--n", 25, "--seed", 3).stdout == proc.stdout
    assert gptstack("world", "sample", "--n", 25, "--seed", 4).stdout != proc.stdout
    counts = [json.loads(x) for x in gptstack("world", "sample", "--family", "count", "--n", 5).stdout.splitlines()]
    assert len(counts) == 5 and {r["family"] for r in counts} == {"count"}
    ev = [json.loads(x) for x in gptstack("world", "sample", "--split", "eval", "--n", 0).stdout.splitlines()]
    assert [r["prompt"] for r in ev] == [t.prompt for t in world.eval_set()]


def test_world_score_adds_gold(tmp_path):
    tasks = world.eval_set()[::50]
    path = tmp_path / "responses.jsonl"
    rows = []
    for t in tasks:
        rows += [{"prompt": t.prompt, "response": t.reference, "id": 1},
                 {"prompt": t.prompt, "response": "The answer is banana banana banana."},
                 {"prompt": t.prompt, "response": t.reference, "ended": False}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = gptstack("world", "score", path, "--details")
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(out) == len(rows)
    for inp, res in zip(rows, out):
        assert {k: res[k] for k in inp} == inp and res["gold"] == world.gold(inp["prompt"], inp["response"], inp.get("ended", True))
    assert [r["gold"] for r in out[:3]] == [1.0, 0.1, 0.18]  # right; wrong and ill-formed (brevity only); cut off and out[0]["correct"] and out[0]["first_wrong_step"] is None
    assert "scored 30 rows" in proc.stderr


def test_world_score_bad_rows(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([
        json.dumps({"prompt": "What is 2 + 3?", "response": "The answer is 5."}),
        json.dumps({"prompt": "What is 2 + 3?"}),
        json.dumps({"prompt": "Tell me a joke.", "response": "No."}),
        "{oops",
    ]) + "\n")
    proc = gptstack("world", "score", path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"{path}:2: response: missing, expected a string" in proc.stderr
    assert f"{path}:3: prompt: expected a task-world prompt" in proc.stderr
    assert f"{path}:4: json:" in proc.stderr
    proc = gptstack("world", "score", path, "--skip-bad-rows")
    assert proc.returncode == 0 and json.loads(proc.stdout)["gold"] == 1.0
    assert "skipped 3 bad rows" in proc.stderr
