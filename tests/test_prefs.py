"""Comparison collection: rows in the ranking format every reader takes, the labeler's ranking
reproduced, duplicates and empty responses left out, labels from files normalised, nothing lost."""
import json
import random
import subprocess
import sys

import pytest
import torch

from gptstack import world
from gptstack.common import UserError
from gptstack.config import build_config
from gptstack.data.formats import read_dataset
from gptstack.model.gpt import GPT
from gptstack.stages import prefs
from gptstack.tokenizer import Tokenizer
from gptstack.rundir import save_model

SMALL = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=256", "prefs.prompts=12",
         "prefs.k=4", "prefs.max_new_tokens=6", "prefs.batch_size=5", "prefs.threads=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run with a random policy whose samples are short, varied (and mostly unfinished)."""
    path = tmp_path_factory.mktemp("run")
    tok = Tokenizer.train("What is 2 + 3? The answer is 5. Which is larger, 4 or 7? " * 100, 400, progress=False)
    cfg = build_config("tiny", sets=SMALL)
    cfg.model.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    save_model(path / "sft", GPT(cfg.model).state_dict(), cfg.to_dict())
    tok.save(path / "tokenizer")
    return path


def test_distinct_responses_drop_duplicates_and_empties():
    keep, dup, empty = prefs.distinct_responses(["a", "b", "a", " ", "a", "c"], [True, True, True, True, False, True])
    assert keep == [0, 1, 4, 5] and dup == 1 and empty == 1  # "a" cut off (ended False) differs from "a" ended


def test_collected_rows_are_rankings_read_dataset_takes(run):
    cfg = build_config("tiny", sets=SMALL)
    summary = prefs.run(cfg, run / "sft", run)
    path = run / "prefs" / "prefs.jsonl"
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    ds = read_dataset(path, expect=("preference", "ranking"))
    assert ds.kind == "ranking" and ds.n_skipped == 0 and len(ds.rows) == len(raw) == summary["prefs/rows"]
    tasks = world.train_tasks(12, seed=cfg.prefs.seed, config=cfg.world)
    by_prompt = {t.prompt: (i, t) for i, t in enumerate(tasks)}
    labeler = world.Labeler.from_config(cfg.world)
    for row, read in zip(raw, ds.rows):
        assert read == {k: row[k] for k in ("prompt", "responses", "ranking", "ended", "gold")}  # extras kept
        i, task = by_prompt[row["prompt"][0]["content"]]
        assert len(set(zip(row["responses"], row["ended"]))) == len(row["responses"]) >= 2
        assert row["gold"] == [world.gold(task, r, e) for r, e in zip(row["responses"], row["ended"])]
        # the ranking is exactly the labeler's, with its seeded noise
        again = labeler.judge(task, row["responses"], random.Random(f"prefs/{cfg.prefs.seed}/{i}"), ended=row["ended"])
        assert row["ranking"] == again.ranking
    skipped = summary["prefs/skipped/fewer_than_2_distinct"]
    assert summary["prefs/rows"] + skipped == 12
    assert summary["prefs/pairs"] == sum(len(r["responses"]) * (len(r["responses"]) - 1) // 2 for r in raw)
    assert (run / "prefs" / "config.json").exists()


def test_existing_labels_are_kept_without_fresh(run):
    path = run / "prefs" / "prefs.jsonl"
    if not path.exists():
        prefs.run(build_config("tiny", sets=SMALL), run / "sft", run)
    before = path.read_text()
    prefs.run(build_config("tiny", sets=[*SMALL, "prefs.seed=99"]), run / "sft", run)
    assert path.read_text() == before
    prefs.run(build_config("tiny", sets=[*SMALL, "prefs.seed=99"]), run / "sft", run, fresh=True)
    assert path.read_text() != before


def test_rankings_from_a_file_are_normalised_with_gold(tmp_path):
    src = tmp_path / "pairs.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "What is 2 + 3?", "chosen": "The answer is 5.", "rejected": "The answer is 6."},
        {"prompt": "Tell me a joke", "chosen": "A joke.", "rejected": "No."},
        {"prompt": "What is 2 + 3?", "chosen": "Same.", "rejected": "Same."},
    ]) + "\n")
    summary = prefs.run(build_config("tiny"), None, tmp_path / "out", rankings=src)
    rows = [json.loads(line) for line in (tmp_path / "out" / "prefs" / "prefs.jsonl").read_text().splitlines()]
    assert rows[0] == {"prompt": [{"role": "user", "content": "What is 2 + 3?"}],
                       "responses": ["The answer is 5.", "The answer is 6."], "ranking": [0, 1],
                       "gold": [world.gold("What is 2 + 3?", "The answer is 5."), world.gold("What is 2 + 3?", "The answer is 6.")]}
    assert "gold" not in rows[1]  # not a world prompt
    assert summary["data/skipped/chosen_equals_rejected"] == 1
    assert summary["prefs/labeler_gold_agreement"] == 1.0


def test_bad_input(tmp_path):
    with pytest.raises(UserError, match="expected --from RUN/sft"):
        prefs.run(build_config("tiny"), None, tmp_path)
    with pytest.raises(UserError, match="prefs.k"):
        prefs.run(build_config("tiny", sets=["prefs.k=1"]), tmp_path / "sft", tmp_path)
    ties = tmp_path / "ties.jsonl"
    ties.write_text(json.dumps({"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}) + "\n")
    with pytest.raises(UserError, match=r"ties.jsonl:1: ranking: expected a permutation .*ties cannot be expressed"):
        prefs.run(build_config("tiny"), None, tmp_path / "out", rankings=ties)
    assert not (tmp_path / "out" / "prefs").exists()


def test_cli_prefs_and_export_routes(tmp_path, monkeypatch):
    proc = subprocess.run([sys.executable, "-m", "gptstack.cli", "prefs", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "export" in proc.stdout and "--rankings" in proc.stdout
    store = pytest.importorskip("gptstack.data.feedback")
    calls = []
    monkeypatch.setattr(store, "export_prefs", lambda run_dir, out_path, kwise=False: calls.append((run_dir, out_path, kwise)) or 3)
    from gptstack.cli import main

    assert main(["prefs", "export", str(tmp_path), "--out", str(tmp_path / "x.jsonl"), "--kwise"]) == 0
    assert calls == [(str(tmp_path), str(tmp_path / "x.jsonl"), True)]


def test_samples_do_not_depend_on_the_batch_size(run, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(run / "sft", other / "sft")
    shutil.copytree(run / "tokenizer", other / "tokenizer")
    a = prefs.run(build_config("tiny", sets=[*SMALL, "prefs.batch_size=2"]), other / "sft", other / "a")
    first = (other / "a" / "prefs" / "prefs.jsonl").read_text()
    b = prefs.run(build_config("tiny", sets=[*SMALL, "prefs.batch_size=7"]), other / "sft", other / "b")
    assert (other / "b" / "prefs" / "prefs.jsonl").read_text() == first and a["prefs/rows"] == b["prefs/rows"]
