"""The report card (gptstack.report): files, sections, numbers equal to the summaries, claims with
hand-computed intervals, partial and empty runs, escaping and self-containment, bad input."""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from gptstack.cli import main
from gptstack.common import UserError
from gptstack.eval.stats import paired_comparison, wilson_interval
from gptstack.report import ReportConfig, write_report
from gptstack.report.card import STAGES, series
from gptstack.world import STYLES

CFG = ReportConfig(samples=5, bon_n=16, dpi=20)  # low dpi: the test checks the plots exist, not their looks
FAMILIES = ("arithmetic", "compare", "count", "lists", "word")
HOSTILE = "<script>alert('x')</script> & \"quotes\" | pipe ``` fence"


def write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def policy(acc: float, ci: list[float], gold: float, kl: float, wall: float, prefix: str = "eval") -> dict:
    out = {f"{prefix}/accuracy": acc, f"{prefix}/accuracy_ci95": ci, f"{prefix}/gold_reward": gold,
           f"{prefix}/format_ok": 0.9875, f"{prefix}/pass@4": min(1.0, acc + 0.1234), f"{prefix}/kl_to_sft": kl,
           f"{prefix}/n_prompts": 500}
    out.update({f"{prefix}/accuracy/{f}": round(acc + 0.01 * (i - 2), 4) for i, f in enumerate(FAMILIES)})
    return out | ({"wall_seconds": wall} if prefix == "eval" else {})


def sampling(mix: dict[str, float], length: float, entropy: float, pass1: float, prefix: str = "eval") -> dict:
    """The eval protocol's T = 1 figures: pass@1, mean length, entropy and the share of each style."""
    return {f"{prefix}/pass@1": pass1, f"{prefix}/length": length, f"{prefix}/entropy": entropy} | {
        f"{prefix}/style/{x}": mix.get(x, 0.0) for x in (*STYLES, "other")}


# distinctive style mixes: SFT as demonstrated, PPO and over-optimization drifting to chatty, GRPO to checked
MIXES = {"base/eval": {"terse": 0.05, "standard": 0.15, "other": 0.8},
         "sft": {"terse": 0.1, "standard": 0.4, "explained": 0.2, "checked": 0.25, "chatty": 0.05},
         "ppo": {"standard": 0.1, "explained": 0.3, "chatty": 0.55, "other": 0.05},
         "overopt": {"chatty": 0.9, "other": 0.1}, "grpo": {"terse": 0.2, "standard": 0.3, "checked": 0.5},
         "dpo": {"standard": 0.35, "explained": 0.35, "checked": 0.123, "chatty": 0.177}}


def overopt_points() -> list[dict]:
    """Held-out points in update order; the proxy peaks at update 50 (not the last), gold earlier, length grows."""
    return [{"step": 10 * i, "kl": 0.5 * i, "d": (0.5 * i) ** 0.5, "proxy": 0.3 * i - 0.03 * i * i,
             "gold": 0.65 + 0.02 * i - 0.004 * i * i, "accuracy": 0.6 - 0.01 * i, "length": 20.0 + 5 * i,
             "style/standard": 0.5 - 0.05 * i, "style/chatty": 0.1 + 0.1 * i,
             "samples": [{"prompt": f"overopt q{j}?", "response": f"update {10 * i} response {j}",
                          "gold": round(0.7 - 0.01 * i - 0.1 * j, 3), "proxy": round(0.2 * i + 0.1 * j, 3)}
                         for j in range(4)]}
            for i in range(8)]


def eval_samples(stage: str) -> list[dict]:
    return [{"family": f, "difficulty": 1, "prompt": f"{stage} question {i} {f}?", "correct": i < len(FAMILIES),
             "response": HOSTILE if (stage == "ppo" and i == 0) else f"{stage} answer {i}"}
            for i, f in enumerate(FAMILIES * 2)]


def rl_metrics(updates: int, gold0: float) -> list[dict]:
    rows = [{"step": 0, "heldout/kl": 0.0, "heldout/gold": gold0}]
    rows += [{"step": 4 * (u + 1), "objective/scores": 0.1 * u, "objective/kl": 0.05 * u, "gold/reward": gold0 + 0.01 * u,
              "gold/accuracy": 0.5, "hack/length": 20 + u, "hack/repetition": 0.01, "episode": 128 * (u + 1)}
             for u in range(updates)]
    return rows


def make_run(root: Path, stages=STAGES) -> Path:
    """A synthetic run directory with the stages' files in their real shapes and distinctive numbers."""
    run = root / "run"
    run.mkdir(parents=True, exist_ok=True)
    s = set(stages)
    if "pretrain" in s:
        write(run / "pretrain/summary.json", {"val_loss": 1.6685, "val_bpb": 1.0249, "tokens_seen": 2457600,
                                              "params": 1328256, "steps": 600, "wall_seconds": 217.8})
        write_rows(run / "pretrain/metrics.jsonl", [{"step": 10 * i, "train/loss": 7 - 0.1 * i} for i in range(1, 60)]
                   + [{"step": 200, "val/loss_estimate": 2.08}, {"step": 600, "val/loss": 1.6685, "val/bpb": 1.0249}])
    if "sft" in s:
        write(run / "sft/summary.json", policy(0.672, [0.6297, 0.7117], 0.6706, 0.0, 946.5)
              | policy(0.218, [0.1840, 0.2563], 0.2497, 0.0, 0, prefix="base/eval") | {"train/final_loss": 0.1318, "steps": 2000}
              | sampling(MIXES["sft"], 18.5, 7.25, 0.6125) | sampling(MIXES["base/eval"], 41.25, 30.5, 0.1625, "base/eval"))
        write_rows(run / "sft/eval_samples.jsonl", eval_samples("sft"))
    if "prefs" in s:
        write(run / "prefs/summary.json", {"prefs/rows": 2603, "prefs/pairs": 12625, "prefs/labeler_gold_agreement": 0.7853,
                                           "prefs/response_accuracy": 0.1804, "prefs/gold_mean": 0.339, "wall_seconds": 73.9})
    if "rm" in s:
        write(run / "rm/summary.json", {"eval/accuracy": 0.6123, "eval/correct_vs_wrong_accuracy": 0.7345,
                                        "eval/labeler_gold_agreement": 0.815, "policy/accuracy": 0.6612,
                                        "eval/gold_spearman": 0.4321, "eval/pairs": 1178, "wall_seconds": 288.3})
    if "bon" in s:
        ns = [1, 2, 4, 8, 16, 32, 64]
        by_n = [{"n": n, "kl": 0.1 * i, "d": (0.1 * i) ** 0.5, "proxy": 0.2 * i, "gold": 0.60 + 0.011 * i,
                 "accuracy": 0.5 if n == 16 else 0.40 + 0.005 * i} for i, n in enumerate(ns)]
        write(run / "bon/summary.json", {"by_n": by_n, "fit/alpha": 0.123, "fit/beta": 0.045, "fit/r2": 0.91,
                                         "gold/n1": 0.60, "prompts": 100, "samples_per_prompt": 64, "wall_seconds": 61.2})
        write_rows(run / "bon/samples.jsonl", [{"prompt": "bon q?", "family": "word", "first": "first answer",
                                                "first_gold": 0.2, "first_proxy": -0.5, "best_of_64": "best answer",
                                                "best_gold": 0.9, "best_proxy": 1.5}])
    if "ppo" in s:
        write(run / "ppo/summary.json", policy(0.70, [0.658, 0.739], 0.6901, 0.4321, 180.2) | {"eval/proxy_score": 1.234, "updates": 60}
              | sampling(MIXES["ppo"], 27.75, 5.125, 0.6375))
        write_rows(run / "ppo/metrics.jsonl", rl_metrics(10, 0.65))
        write_rows(run / "ppo/eval_samples.jsonl", eval_samples("ppo"))
    if "overopt" in s:
        write(run / "overopt/summary.json", policy(0.61, [0.567, 0.651], 0.6123, 3.5, 300.0) | {
            "points": overopt_points(), "fit/alpha": 0.0456, "fit/beta": 0.0321, "fit/r2": 0.876, "fit/gold_at_d0": 0.65,
            "gold_peak_d": 1.234, "eval/proxy_score": 2.5} | sampling(MIXES["overopt"], 55.5, 3.375, 0.5125))
        write_rows(run / "overopt/metrics.jsonl", rl_metrics(15, 0.65))
        write_rows(run / "overopt/eval_samples.jsonl", eval_samples("overopt"))
    if "grpo" in s:
        write(run / "grpo/summary.json", policy(0.655, [0.612, 0.696], 0.7012, 0.2345, 170.0) | {"updates": 60, "reward": "gold"}
              | sampling(MIXES["grpo"], 15.5, 4.0, 0.6625))
        write_rows(run / "grpo/metrics.jsonl", rl_metrics(8, 0.6))
        write_rows(run / "grpo/eval_samples.jsonl", eval_samples("grpo"))
    if "dpo" in s:
        write(run / "dpo/summary.json", policy(0.664, [0.621, 0.704], 0.6655, 0.1111, 90.5)
              | {"eval_rewards/accuracies": 0.5678, "eval_rewards/margins": 0.0123, "eval_loss": 0.6789, "steps": 300}
              | sampling(MIXES["dpo"], 22.0, 6.5, 0.625))
        write_rows(run / "dpo/metrics.jsonl", [{"step": 10 * i, "loss": 0.69 - 0.01 * i, "rewards/margins": 0.01 * i,
                                                "rewards/accuracies": 0.5 + 0.01 * i} for i in range(1, 10)])
        write_rows(run / "dpo/eval_samples.jsonl", eval_samples("dpo"))
    if "prm" in s:
        write(run / "prm/summary.json", {"prm/eval/step_accuracy": 0.7797, "prm/eval/step_auroc": 0.8638,
                                         "prm/eval/outcome_auroc": 0.8503, "orm/eval/outcome_auroc": 0.8475,
                                         "prm/eval/best_of_k": 0.4304, "orm/eval/best_of_k": 0.4051, "eval/pass@k": 0.6709,
                                         "data/labels": "checker", "wall_seconds": 159.4})
    if "search" in s:
        ns = ["1", "4", "16"]
        acc = {"prm": {"1": 0.30, "4": 0.45, "16": 0.55}, "orm": {"1": 0.30, "4": 0.40, "16": 0.42},
               "rm": {n: None for n in ns}, "majority": {"1": 0.30, "4": 0.35, "16": 0.36},
               "prm_search": {"1": 0.31, "4": 0.47, "16": 0.58}}
        tokens = {m: {n: 35.0 * int(n) for n in ns} for m in acc}
        write(run / "search/summary.json", {"accuracy": acc, "tokens": tokens, "oracle": {"1": 0.3, "4": 0.6, "16": 0.8},
                                            "n_prompts": 100, "samples_per_prompt": 16, "wall_seconds": 101.8})
        write_rows(run / "search/picks.jsonl", [{"prompt": "search q?", "prm": {"response": "p", "correct": True, "score": 0.9},
                                                 "orm": {"response": "o", "correct": False, "score": 0.1},
                                                 "majority": {"answer": "3", "correct": True},
                                                 "prm_search": {"response": "s", "correct": True}}])
    return run


# --- parsing the report back -------------------------------------------------------------------------


def md_tables(md: str) -> list[list[list[str]]]:
    """Every markdown table as rows of cells (header first, separator dropped)."""
    tables, current = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(set(c) <= {"-"} for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def parse(cell: str):
    """A formatted figure -> (value, tolerance) in the summary's units; intervals -> [(lo, tol), (hi, tol)]."""
    if cell.startswith("["):
        lo, hi = re.match(r"\[([-\d.]+), ([-\d.]+)\] %", cell).groups()
        return [(float(lo) / 100, 5e-4 + 1e-9), (float(hi) / 100, 5e-4 + 1e-9)]
    if cell.endswith(" %"):
        return float(cell[:-2]) / 100, 5e-4 + 1e-9
    if cell.endswith(" min"):
        return float(cell[:-4]) * 60, 3 + 1e-6
    if cell.endswith(" s"):
        return float(cell[:-2]), 0.05 + 1e-9
    return float(cell.replace(",", "")), 5e-4 + 1e-9


def close(cell: str, value) -> bool:
    got = parse(cell)
    if isinstance(got, list):
        return all(abs(g - v) <= tol for (g, tol), v in zip(got, value))
    return abs(got[0] - value) <= got[1]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("full"))
    md, page = write_report(run, CFG)
    return run, md.read_text(encoding="utf-8"), page.read_text(encoding="utf-8")


# --- tests -------------------------------------------------------------------------------------------------


def test_full_run_writes_every_section_and_plot(full):
    run, md, page = full
    for stage in STAGES:
        assert f"({stage})\n" in md and f"id='{stage}'" in page
    assert "Not run" not in md and "not measured" not in md
    names = {p.name for p in run.glob("report-*.png")}
    assert names == {"report-pretrain-loss.png", "report-accuracy-by-family.png", "report-rm.png", "report-bon.png",
                     "report-ppo-curves.png", "report-overopt.png", "report-overopt-curves.png", "report-grpo-curves.png",
                     "report-grpo-vs-ppo.png", "report-dpo-curves.png", "report-search.png"}
    for name in names:  # each plot is linked from the markdown and embedded in the HTML
        assert f"]({name})" in md
    assert page.count("src='data:image/png;base64,") == len(names)


def check_figure_tables(run: Path, md: str) -> int:
    """Every `figure | value | key` row of every stage section reads back to its summary.json value."""
    checked = 0
    for stage in STAGES:
        text = md.split(f"({stage})\n", 1)[1].split("\n## ", 1)[0]
        if not (run / stage / "summary.json").exists():
            continue
        summary = json.loads((run / stage / "summary.json").read_text())
        for table in md_tables(text):
            if table[0] != ["figure", "value", "summary key"]:
                continue
            for _, cell, key in table[1:]:
                value = summary[key.strip("`")]
                assert cell == value if isinstance(value, str) else close(cell, value), (stage, key, cell, value)
                checked += 1
    return checked


def check_top_table(run: Path, md: str) -> dict[str, list[str]]:
    """The top table's policy rows (and base's) equal the summaries; returns the rows by stage."""
    top = md_tables(md)[0]
    assert top[0] == ["stage", "accuracy", "95 % interval", "gold reward", "KL to SFT", "wall time", "other"]
    rows = {r[0]: r for r in top[1:]}
    for stage in ("sft", "ppo", "overopt", "grpo", "dpo"):
        s = json.loads((run / stage / "summary.json").read_text())
        _, acc, ci, gold, kl, wall, _ = rows[stage]
        assert close(acc, s["eval/accuracy"]) and close(ci, s["eval/accuracy_ci95"]) and close(gold, s["eval/gold_reward"])
        assert close(kl, s["eval/kl_to_sft"]) and close(wall, s["wall_seconds"])
    sft = json.loads((run / "sft/summary.json").read_text())
    base = rows["base (few-shot)"]
    assert close(base[1], sft["base/eval/accuracy"]) and close(base[2], sft["base/eval/accuracy_ci95"])
    assert close(base[3], sft["base/eval/gold_reward"])
    return rows


def test_key_figure_tables_equal_the_summaries(full):
    run, md, _ = full
    assert check_figure_tables(run, md) >= 60


def test_top_table_equals_the_summaries(full):
    run, md, _ = full
    rows = check_top_table(run, md)
    bon = json.loads((run / "bon/summary.json").read_text())
    n16 = next(r for r in bon["by_n"] if r["n"] == 16)
    row = rows["bon (best-of-16)"]
    assert close(row[1], n16["accuracy"]) and close(row[3], n16["gold"]) and close(row[4], n16["kl"])
    assert row[2] == "[40.4, 59.6] %"  # Wilson, 50 of 100 prompts, by hand: 0.5 ± 1.96·√(0.0025 + 0.000096)/1.0384
    total = sum(json.loads((run / st / "summary.json").read_text())["wall_seconds"] for st in STAGES)
    assert close(rows["total"][5], total)
    # bon's by_n table and search's accuracy table, cell by cell
    by_n = next(t for t in md_tables(md) if t[0][:3] == ["n", "KL", "d = √KL"])
    for cells, r in zip(by_n[1:], bon["by_n"]):
        assert int(cells[0]) == r["n"] and all(close(c, r[k]) for c, k in zip(cells[1:], ("kl", "d", "proxy", "gold", "accuracy")))
    search = json.loads((run / "search/summary.json").read_text())
    acc = next(t for t in md_tables(md) if t[0][0] == "method")
    for cells in acc[1:]:
        if cells[0] in search["accuracy"]:
            for n, c in zip(("1", "4", "16"), cells[1:]):
                v = search["accuracy"][cells[0]][n]
                assert c == "—" if v is None else close(c, v)


def test_claims_state_numbers_and_whether_intervals_separate(full):
    """Without a paired test (no shared prompts here) a claim holds only when the intervals separate."""
    _, md, _ = full
    claims = {r[0]: r for r in next(t for t in md_tables(md) if t[0] == ["claim", "A", "B", "holds?"])[1:]}
    assert claims["SFT > base (few-shot)"][1:] == ["SFT: 67.2 % [63.0, 71.2] %", "base: 21.8 % [18.4, 25.6] %",
                                                   "holds; the 95 % intervals separate"]
    assert claims["PPO > SFT"][3] == "not shown; the 95 % intervals overlap"   # 70.0 vs 67.2: ahead, within the noise
    assert claims["GRPO > PPO"][3] == "no; the 95 % intervals overlap"   # 65.5 vs 70.0
    assert claims["DPO > SFT"][3].startswith("no;")
    # best-of-16 = 50/100 vs best-of-1 = 40/100: Wilson [40.4, 59.6] vs [30.9, 49.8] overlap
    assert claims["best-of-16 > best-of-1"][1:] == ["best-of-16: 50.0 % [40.4, 59.6] %", "best-of-1: 40.0 % [30.9, 49.8] %",
                                                    "not shown; the 95 % intervals overlap"]
    # search at the largest N (16): prm 55 % vs orm 42 % (Wilson over 100 prompts) and orm 42 % vs majority 36 %
    assert claims["PRM ≥ ORM (best-of-N)"][1] == "prm (N=16): 55.0 % [45.2, 64.4] %"
    assert claims["PRM ≥ ORM (best-of-N)"][3] == "not shown; the 95 % intervals overlap"
    assert claims["ORM ≥ majority vote"][3].startswith("not shown;")
    assert not any(r[3].startswith("yes") for r in claims.values())


def test_stage_claims_add_the_paired_comparison_on_shared_prompts(tmp_path, full):
    run = make_run(tmp_path, stages=("sft", "grpo", "dpo"))
    # grpo answers sft's 10 prompts (sft: the first 5 right): right on 0-3 and 5-8, so GRPO alone is right
    # on 5, 6, 7, 8 (b = 4) and SFT alone on 4 (c = 1); McNemar p = 2 * (1 + 5) / 32 = 0.375
    grpo = [r | {"correct": i in (0, 1, 2, 3, 5, 6, 7, 8)} for i, r in enumerate(eval_samples("sft"))]
    write_rows(run / "grpo/eval_samples.jsonl", grpo[::-1])   # matched by prompt, not by line
    (run / "dpo/eval_samples.jsonl").unlink()
    md = write_report(run, CFG)[0].read_text()
    claims = {r[0]: r[3] for r in next(t for t in md_tables(md) if t[0][0] == "claim")[1:]}
    sentence, paired = claims["GRPO > SFT"].split("; paired on ")
    # the paired test decides: +30 points on these samples, but its interval reaches below 0
    assert sentence == "not shown; the 95 % intervals overlap"
    m = re.fullmatch(r"the same (\d+) prompts: ([+−][\d.]+) points \[([+−][\d.]+), ([+−][\d.]+)\], "
                     r"b = (\d+), c = (\d+), McNemar p = ([\d.]+)", paired)
    assert m, paired
    number = lambda t: float(t.replace("−", "-"))
    ref = paired_comparison([r["correct"] for r in grpo], [i < 5 for i in range(10)])   # A = GRPO, B = SFT
    assert (int(m[1]), int(m[5]), int(m[6]), float(m[7])) == (10, 4, 1, 0.38)
    assert number(m[2]) == 30.0
    assert [number(m[3]), number(m[4])] == [round(100 * x, 1) for x in ref["ci95"]]
    assert number(m[3]) < 30.0 < number(m[4])
    assert claims["SFT > base (few-shot)"] == "holds; the 95 % intervals separate"   # the base model has no samples
    assert claims["DPO > SFT"] == "no; the 95 % intervals overlap"
    assert "DPO vs SFT: no paired comparison, dpo/eval_samples.jsonl is missing or empty." in md
    # the full run's stages answer different prompts: no paired line, a note saying why
    _, full_md, _ = full
    assert ("PPO vs SFT: no paired comparison, ppo/eval_samples.jsonl and sft/eval_samples.jsonl answer different "
            "prompts (10 and 10, 0 shared).") in full_md
    assert "paired on" not in full_md


def test_claims_hold_only_when_the_paired_test_supports_them(tmp_path):
    """Four stages answering the same 200 prompts, summaries consistent with the samples: the paired
    interval decides, even where the independent intervals overlap."""
    run = make_run(tmp_path, stages=("sft", "ppo", "grpo", "dpo"))
    right = {"sft": lambda i: i < 100,                          # 100 / 200
             "ppo": lambda i: i < 95,                           # vs SFT: b = 0, c = 5
             "grpo": lambda i: i < 120,                         # vs SFT: b = 20, c = 0; vs PPO: b = 25, c = 0
             "dpo": lambda i: i < 97 or 100 <= i < 106}         # vs SFT: b = 6, c = 3
    for stage, ok in right.items():
        correct = [ok(i) for i in range(200)]
        summary = json.loads((run / stage / "summary.json").read_text())
        summary |= {"eval/accuracy": sum(correct) / 200, "eval/accuracy_ci95": wilson_interval(sum(correct), 200)}
        write(run / stage / "summary.json", summary)
        write_rows(run / stage / "eval_samples.jsonl", [{"family": "word", "prompt": f"q{i}?", "response": "r", "correct": c}
                                                        for i, c in enumerate(correct)])
    test = lambda a, b: paired_comparison([right[a](i) for i in range(200)], [right[b](i) for i in range(200)])["ci95"]
    assert test("grpo", "sft")[0] > 0 and test("grpo", "ppo")[0] > 0     # the fixture is what the names say
    assert test("dpo", "sft")[0] < 0 < test("dpo", "sft")[1]
    md = write_report(run, CFG)[0].read_text()
    claims = {r[0]: r[3] for r in next(t for t in md_tables(md) if t[0][0] == "claim")[1:]}
    # 60 % vs 50 %: Wilson [53.1, 66.5] and [43.1, 56.9] overlap, yet the paired test supports the claim
    assert claims["GRPO > SFT"].startswith("holds; the 95 % intervals overlap; paired on the same 200 prompts: +10.0 points [+")
    assert claims["GRPO > PPO"].startswith("holds;")
    assert claims["DPO > SFT"].startswith("not shown; the 95 % intervals overlap; paired on the same 200 prompts: "
                                          "+1.5 points [−")   # ahead, but the paired interval straddles 0
    assert claims["PPO > SFT"].startswith("no; the 95 % intervals overlap; paired on the same 200 prompts: −2.5 points")


def sampling_rows(md: str) -> dict[str, list[str]]:
    table = next(t for t in md_tables(md) if t[0][:2] == ["stage", "accuracy (greedy)"])
    assert table[0] == ["stage", "accuracy (greedy)", "pass@1 (T = 1)", "length (words)", "entropy (nats)", *STYLES, "other"]
    return {r[0]: r for r in table[1:]}


def test_overview_shows_pass1_length_entropy_and_style_mix(full):
    run, md, _ = full
    overview = md.split("## Pretraining", 1)[0]
    rows = sampling_rows(overview)
    assert list(rows) == ["base (few-shot)", "sft", "ppo", "overopt", "grpo", "dpo"]
    for label, row in rows.items():
        stage, prefix = ("sft", "base/eval") if label.startswith("base") else (label, "eval")
        s = json.loads((run / stage / "summary.json").read_text())
        keys = ["accuracy", "pass@1", "length", "entropy", *(f"style/{x}" for x in (*STYLES, "other"))]
        assert all(close(cell, s[f"{prefix}/{k}"]) for cell, k in zip(row[1:], keys)), (label, row)
    # the mixes, by hand: RL moved SFT's standard answers to chatty ones
    assert rows["sft"][5:] == ["10.0 %", "40.0 %", "20.0 %", "25.0 %", "5.0 %", "0.0 %"]
    assert rows["ppo"][5:] == ["0.0 %", "10.0 %", "30.0 %", "0.0 %", "55.0 %", "5.0 %"]
    assert rows["dpo"][1:5] == ["66.4 %", "62.5 %", "22.000", "6.500"]


def test_overopt_section_shows_the_proxy_peak_samples(full):
    run, md, page = full
    section = md.split("(overopt)\n", 1)[1].split("\n## ", 1)[0]
    points = json.loads((run / "overopt/summary.json").read_text())["points"]
    table = next(t for t in md_tables(section) if t[0][0] == "update")
    assert table[0] == ["update", "KL", "d = √KL", "proxy", "gold", "accuracy", "length (words)", "standard", "chatty"]
    for cells, p in zip(table[1:], points):
        assert all(close(c, p[k]) for c, k in zip(cells[1:], ("kl", "d", "proxy", "gold", "accuracy", "length",
                                                               "style/standard", "style/chatty")))
    # the proxy peaks at update 50 (0.75), not at the last point: its samples, then update 0's for contrast
    assert "Held-out responses at the proxy's peak: update 50, d = 1.581, mean proxy 0.750, mean gold 0.650." in section
    labels = re.findall(r"^\*(update \d+ · .+?)\*$", section, flags=re.MULTILINE)
    assert labels == [f"update 50 · proxy {1.0 + 0.1 * j:.3f}, gold {0.65 - 0.1 * j:.3f}" for j in range(4)] + [
        f"update 0 · proxy {0.1 * j:.3f}, gold {0.7 - 0.1 * j:.3f}" for j in range(4)]
    assert section.index("A: update 50 response 3") < section.index("Held-out responses at the first point")
    assert "A: update 0 response 0" in section and "update 70 response" not in section
    assert "A: update 50 response 0" in page.split("id='overopt'", 1)[1]


def test_old_summaries_without_the_new_keys_still_render(tmp_path):
    run = make_run(tmp_path, stages=("sft", "ppo", "overopt"))
    for stage in ("sft", "ppo", "overopt"):
        s = json.loads((run / stage / "summary.json").read_text())
        s = {k: v for k, v in s.items() if not re.search(r"eval/(pass@1|length|entropy|style/)", k)}
        s["points"] = [{k: p[k] for k in ("step", "kl", "d", "gold")} for p in s.get("points", [])]
        write(run / stage / "summary.json", s)
    md = write_report(run, CFG)[0].read_text()
    assert not any(t[0][:2] == ["stage", "accuracy (greedy)"] for t in md_tables(md))   # no table of dashes
    section = md.split("(overopt)\n", 1)[1].split("\n## ", 1)[0]
    assert next(t for t in md_tables(section) if t[0][0] == "update")[1][3:] == ["—", "0.650", "—", "—"]
    assert "proxy's peak" not in section and "Held-out responses" not in section
    assert (run / "report-overopt.png").exists()
    # half-new: one stage with the keys gets its row, the others dashes
    write(run / "ppo/summary.json", json.loads((run / "ppo/summary.json").read_text()) | sampling(MIXES["ppo"], 27.75, 5.125, 0.6375))
    rows = sampling_rows(write_report(run, CFG)[0].read_text())
    assert rows["sft"][2:] == ["—"] * 9 and rows["ppo"][9] == "55.0 %"


def test_partial_run_says_what_did_not_run(tmp_path):
    run = make_run(tmp_path, stages=("pretrain", "sft"))
    # a stage still running: metrics so far (the last line cut off mid-write), no summary
    (run / "ppo").mkdir()
    rows = rl_metrics(3, 0.6) + [{"step": 14, "objective/kl": 0.2, "objective/scores": "nan", "episode": 512}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 16, "objective/kl": 0.'
    (run / "ppo/metrics.jsonl").write_text(text)
    md_path, html_path = write_report(run, CFG)
    md = md_path.read_text()
    for stage in ("prefs", "rm", "bon", "overopt", "grpo", "dpo", "prm", "search"):
        section = md.split(f"({stage})\n", 1)[1].split("\n## ", 1)[0]
        assert f"Not run: there is no {stage}/" in section
    assert "Not finished: ppo/ exists but has no summary.json" in md
    assert (run / "report-ppo-curves.png").exists()
    claims = {r[0]: r[3] for r in next(t for t in md_tables(md) if t[0][0] == "claim")[1:]}
    assert claims["SFT > base (few-shot)"] == "holds; the 95 % intervals separate"
    assert claims["PPO > SFT"] == "not measured (PPO not run)"
    assert claims["best-of-16 > best-of-1"].startswith("not measured")
    assert html_path.exists()


def test_series_sorts_keeps_the_last_repeat_and_drops_non_finite():
    rows = [{"step": 20, "loss": 2.0}, {"step": 10, "loss": 3.0}, {"step": 20, "loss": 1.5}, {"step": 30, "loss": "nan"},
            {"step": 40, "loss": "inf"}, {"step": 50}, {"step": 60, "loss": True}, {"loss": 9.0}, {"step": 70, "loss": 1}]
    assert series(rows, "loss") == [(10, 3.0), (20, 1.5), (70, 1)]


def test_empty_run_directory(tmp_path):
    md, page = write_report(tmp_path, CFG)
    text = md.read_text()
    assert text.count("Not run: there is no") == len(STAGES)
    assert not list(tmp_path.glob("report-*.png")) and "<img" not in page.read_text()


def test_html_escapes_model_output_and_is_self_contained(full):
    run, md, page = full
    assert "<script" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;quotes&quot;" in page
    assert not re.search(r"<(link|iframe|object|embed)\b", page) and "@import" not in page and "url(" not in page
    srcs = re.findall(r"\b(?:src|href)=['\"]([^'\"]*)", page)
    assert srcs and all(s.startswith(("data:image/png;base64,", "#")) for s in srcs)
    # the embedded images are the PNG files beside report.md, byte for byte
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in srcs if s.startswith("data:")}
    assert embedded == {p.read_bytes() for p in run.glob("report-*.png")}
    assert all(b.startswith(b"\x89PNG") for b in embedded)
    # markdown: the response sits in a code fence longer than its own ``` run, so it cannot close it
    assert "````text\nQ: ppo question 0 arithmetic?\nA: " + HOSTILE + "\n````" in md


def test_samples_show_one_per_family_right_and_wrong_alternating(full):
    _, md, _ = full
    section = md.split("(sft)\n", 1)[1].split("\n## ", 1)[0]
    labels = re.findall(r"^\*(.+?)\*$", section, flags=re.MULTILINE)
    assert labels == ["arithmetic · correct", "compare · wrong", "count · correct", "lists · wrong", "word · correct"]
    # every family's first sample is right: for compare and lists the pick skips to their first wrong one
    assert "Q: sft question 6 compare?" in section and "Q: sft question 1 compare?" not in section
    assert "Q: sft question 8 lists?" in section


def test_bad_input_is_named(tmp_path):
    run = make_run(tmp_path, stages=("sft",))
    (run / "sft/summary.json").write_text('{"eval/accuracy": 0.5,\n "eval/gold_reward": }')
    with pytest.raises(UserError, match=r"sft/summary.json:2: not valid JSON"):
        write_report(run, CFG)
    write(run / "sft/summary.json", {"eval/accuracy": "high"})
    with pytest.raises(UserError, match=r"sft/summary.json: eval/accuracy: expected a number, got 'high'"):
        write_report(run, CFG)
    write(run / "sft/summary.json", {"eval/accuracy": 0.5})
    (run / "sft/eval_samples.jsonl").write_text('{"prompt": "a"}\nnot json\n{"prompt": "b"}\n')
    with pytest.raises(UserError, match=r"sft/eval_samples.jsonl:2: not valid JSON"):
        write_report(run, CFG)
    with pytest.raises(UserError, match="not a run directory"):
        write_report(tmp_path / "missing", CFG)
    assert not (run / "report.md").exists()  # nothing written when the input is bad


def test_cli_report(tmp_path, capsys):
    run = make_run(tmp_path, stages=("pretrain", "sft"))
    assert main(["report", str(run), "--set", "report.dpi=20", "--set", "report.samples=2"]) == 0
    md = (run / "report.md").read_text()
    assert (run / "report.html").exists() and "wrote" in capsys.readouterr().err
    assert len(re.findall(r"^\*(arithmetic|compare) · ", md, flags=re.MULTILINE)) == 2
    assert main(["report", str(tmp_path / "nope")]) == 2
    with pytest.raises(SystemExit):
        main(["report", "--help"])


@pytest.mark.slow
def test_report_of_a_real_micro_run(tmp_path):
    """The stages' own summaries (micro recipe, all 11 stages, ~25 s): every section filled, figures equal."""
    from gptstack import pipeline
    from gptstack.config import build_config

    run = tmp_path / "run"
    pipeline.run(build_config("micro"), run, report=False)
    md, page = write_report(run, CFG)
    text = md.read_text()
    assert "Not run" not in text and "Not finished" not in text and "not measured" not in text
    assert check_figure_tables(run, text) >= 60
    check_top_table(run, text)
    assert len(list(run.glob("report-*.png"))) == 11 and "<script" not in page.read_text()


def test_a_run_on_users_files_says_what_was_measured_where(tmp_path):
    """hf-small: an imported model, ppo on a prompts file (the RM's score beside SFT's, no world
    figure), grpo on a verifiable file (accuracy on the file's answers): the claims compare nothing
    measured on different sets, and the overview says where each figure comes from."""
    run = make_run(tmp_path, stages=("pretrain", "sft", "rm", "ppo", "grpo"))
    write(run / "pretrain/summary.json", {"imported_from": "/models/qwen", "chat": "model", "params": 494_000_000,
                                          "vocab_size": 151_936, "added_specials": [], "architecture": "qwen2"})
    write(run / "ppo/summary.json", {"eval/proxy_score": 0.42, "eval/sft_proxy_score": 0.1, "eval/kl_to_sft": 1.5,
                                     "eval/heldout_prompts": 50, "updates": 100, "reward": "rm", "wall_seconds": 9.0})
    grpo = json.loads((run / "grpo/summary.json").read_text())
    write(run / "grpo/summary.json", {**grpo, "reward": "answer"})
    md = write_report(run, CFG)[0].read_text()
    rows = {r[0]: r for r in next(t for t in md_tables(md) if t[0][0] == "stage")[1:]}
    assert rows["pretrain"][-1] == "imported from /models/qwen (qwen2, chat format: model)"
    assert rows["ppo"][-1] == "proxy score 0.420 (SFT 0.100)"
    assert "its file's held-out answers" in rows["grpo"][-1]
    claims = {r[0]: r[3] for r in next(t for t in md_tables(md) if t[0][0] == "claim")[1:]}
    assert claims["PPO > SFT"] == "not measured (PPO ran without a world evaluation (a prompts file))"
    assert claims["GRPO > SFT"] == "not measured (GRPO measured on its own file's answers, not the world's eval set)"
