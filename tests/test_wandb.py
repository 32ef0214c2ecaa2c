"""log.wandb: every metric of metrics.jsonl also to Weights & Biases (offline mode here: no network),
one run per stage continued on resume, TRL's names beside ours, and one clear error without the
package. The offline runs are read back from their .wandb files (W&B's record log of protobufs)."""
import json
import random
import struct
import sys

import pytest

from gptstack import cli
from gptstack.common import UserError
from gptstack.config import LogConfig, build_config
from gptstack.stages import dpo, pretrain
from gptstack.train.metrics import WANDB_ID_FILE, MetricsLogger, read_metrics, trl_names
from test_dpo import SMALL as DPO_SMALL, WORLD_ROWS, make_run, tok, write_jsonl  # noqa: F401 (tok: the module's fixture)

SMALL = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "pretrain.batch_size=4",
         "pretrain.max_steps=8", "pretrain.warmup_steps=2", "pretrain.log_every=1", "pretrain.checkpoint_every=0",
         "pretrain.lr=3e-3", "tokenizer.vocab_size=300", "pretrain.peak_flops=1e12"]
MISSING = "log.wandb: needs the wandb package: pip install 'gptstack[wandb]'"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """W&B in offline mode, its settings and caches under tmp_path, nothing of the user's taken."""
    for var in ("WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while one small bird sings in the old tree".split()
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(1500)))
    return path


def wandb_records(path):
    """The protobuf records of an offline run's .wandb file: a 7-byte header (":W&B", magic, version),
    then LevelDB-log blocks of 32 KiB whose records (crc32, length, type) may span blocks."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunk = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a record header is zero padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(chunk)
            yield record
            chunk = b""


def offline_runs(stage_dir):
    """[(run record, history rows)] of every offline run under RUN/<stage>/wandb, each finished."""
    import wandb

    wandb.teardown()   # the W&B service writes the record log in the background: flushed when it stops
    out = []
    for path in sorted(stage_dir.glob("wandb/offline-run-*/run-*.wandb")):
        run, history, kinds = None, [], []
        for r in wandb_records(path):
            kinds.append(r.WhichOneof("record_type"))
            if kinds[-1] == "run":
                run = r.run
            elif kinds[-1] == "history":
                history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in r.history.item})
        assert run is not None and kinds[-1] == "exit", (path, kinds)
        out.append((run, history))
    return out


def test_a_pretrain_logs_to_an_offline_run_continued_on_resume(offline, corpus, tmp_path):
    def cfg(*extra):
        return build_config("tiny", {"data": {"paths": [str(corpus)]}},
                            [*SMALL, "log.wandb=true", "log.wandb_project=gptstack-test", *extra])

    pretrain.run(cfg("pretrain.stop_at=3"), tmp_path / "myrun")
    stage = tmp_path / "myrun/pretrain"
    run_id = (stage / WANDB_ID_FILE).read_text().strip()
    pretrain.run(cfg(), tmp_path / "myrun")   # resumes at step 3: the same W&B run
    assert (stage / WANDB_ID_FILE).read_text().strip() == run_id

    runs = offline_runs(stage)
    assert len(runs) == 2   # offline, each session writes its own file; `wandb sync` joins them by id
    for run, _ in runs:
        assert (run.run_id, run.project, run.display_name, run.run_group, run.job_type) == \
            (run_id, "gptstack-test", "myrun/pretrain", "myrun", "pretrain")
    config = {item.key: json.loads(item.value_json) for item in runs[0][0].config.update}
    assert config["pretrain"]["max_steps"] == 8 and config["log"]["wandb"] is True   # the resolved config
    rows = read_metrics(stage / "metrics.jsonl")
    history = [row for _, rows_of_run in runs for row in rows_of_run]
    logged = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    on_wandb = {h["train/global_step"]: h["train/loss"] for h in history if "train/loss" in h}
    assert list(logged) == list(range(1, 9))
    assert on_wandb == pytest.approx(logged)   # the same steps and values, across the resume
    lrs = {r["step"]: r["train/lr"] for r in rows if "train/lr" in r}
    assert {h["train/global_step"]: h["train/learning_rate"] for h in history if "train/lr" in h} == pytest.approx(lrs)
    assert {h["train/global_step"] for h in history if "val/loss" in h} == {8}   # the final eval's line too
    assert all("train/learning_rate" not in r for r in rows)   # TRL's aliases stay out of metrics.jsonl


class FakeRun:
    def __init__(self, **kwargs):
        self.kwargs, self.rows, self.id, self.finished = kwargs, [], kwargs["id"] or "fresh1", False

    def define_metric(self, *args, **kwargs):
        pass

    def log(self, row):
        self.rows.append(row)

    def finish(self):
        self.finished = True


def test_dpo_gets_trls_names_on_wandb_and_ours_in_metrics_jsonl(tok, tmp_path, monkeypatch):  # noqa: F811
    """A recorder stands in for wandb.init (the offline run is the test above): the DPO stage's own
    metric keys, held-out ones included, reach W&B also under TRL's names."""
    import wandb

    runs = []
    monkeypatch.setattr(wandb, "init", lambda **kw: runs.append(FakeRun(**kw)) or runs[-1])
    sets = [*DPO_SMALL, "dpo.max_steps=2", "dpo.eval_every=1", "eval.limit=2", "log.wandb=true"]
    policy = make_run(tmp_path, tok, sets)
    write_jsonl(tmp_path / "prefs.jsonl", WORLD_ROWS)
    summary = dpo.run(build_config("tiny", sets=sets), policy, tmp_path / "prefs.jsonl", tmp_path)
    (run,) = runs
    assert run.finished and run.kwargs["job_type"] == "dpo" and run.kwargs["config"]["dpo"]["max_steps"] == 2
    rows = read_metrics(tmp_path / "dpo" / "metrics.jsonl")
    assert [{k: v for k, v in r.items() if k != "train/global_step"} for r in run.rows] == [
        {k: v for k, v in r.items() if k != "step"} | {trl: r[ours] for ours, trl in
                                                       trl_names(dpo.METRICS).items() | {("train/lr", "train/learning_rate")}
                                                       if ours in r} for r in rows]
    train = next(r for r in run.rows if "loss" in r)
    for name in ("train/loss", "train/learning_rate", "train/grad_norm", "train/epoch", "train/rewards/chosen",
                 "train/rewards/rejected", "train/rewards/accuracies", "train/rewards/margins", "train/logps/chosen",
                 "train/logps/rejected"):
        assert name in train, name
    assert train["train/loss"] == train["loss"] and train["train/global_step"] == 1
    epochs = [r["train/epoch"] for r in rows if "loss" in r]   # TRL's epoch: pairs drawn / training pairs
    assert epochs == pytest.approx([4 / summary["data/train_pairs"], 8 / summary["data/train_pairs"]])
    heldout = next(r for r in run.rows if "eval_loss" in r)
    assert heldout["eval/rewards/accuracies"] == heldout["eval_rewards/accuracies"]
    assert all(not any(trl in r for trl in ("train/learning_rate", "train/rewards/chosen", "eval/loss")) for r in rows)


def test_a_resumed_logger_passes_the_stored_id_and_a_fresh_one_starts_a_new_run(tmp_path, monkeypatch):
    import wandb

    runs = []
    monkeypatch.setattr(wandb, "init", lambda **kw: runs.append(FakeRun(**kw)) or runs[-1])
    log = LogConfig(wandb=True, wandb_run="exp1")
    MetricsLogger(tmp_path / "sft", log=log).close()
    assert (tmp_path / "sft" / WANDB_ID_FILE).read_text() == "fresh1\n"
    (tmp_path / "sft" / WANDB_ID_FILE).write_text("abc123\n")
    MetricsLogger(tmp_path / "sft", resume_step=4, log=log).close()
    MetricsLogger(tmp_path / "sft", log=log).close()   # metrics start over (--fresh, no checkpoint): a new run
    assert [(r.kwargs["id"], r.kwargs["resume"]) for r in runs] == [(None, None), ("abc123", "allow"), (None, None)]
    assert {(r.kwargs["name"], r.kwargs["group"]) for r in runs} == {("exp1/sft", "exp1")}
    assert MetricsLogger(tmp_path / "rm", enabled=False, log=log).wandb is None and len(runs) == 3   # rank > 0


def test_without_the_package_log_wandb_is_one_error_before_any_work(tmp_path, monkeypatch, capsys, corpus):
    monkeypatch.setitem(sys.modules, "wandb", None)   # `import wandb` raises ImportError
    with pytest.raises(UserError) as e:
        build_config("tiny", sets=["log.wandb=true"])
    assert str(e.value) == MISSING
    build_config("tiny", sets=["log.wandb=false"])   # not asked for: not needed
    out = tmp_path / "run"
    assert cli.main(["pretrain", "--data", str(corpus), "--out", str(out), "--set", "log.wandb=true"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {MISSING}"
    assert not out.exists()
