"""The report card: RUN/report.md and a self-contained RUN/report.html, read from the stages' files.

    gptstack report runs/tiny                     # report.md, report.html, report-*.png in runs/tiny
    gptstack report runs/tiny --set report.samples=3
    python -c "from gptstack.report import write_report; print(write_report('runs/tiny'))"

Every figure is read from RUN/<stage>/summary.json; curves come from metrics.jsonl, sample responses
from eval_samples.jsonl (bon: samples.jsonl, search: picks.jsonl). Nothing is recomputed except 95 %
Wilson intervals where a summary gives a bare proportion (best-of-n, search without accuracy_ci95),
taken over the number of prompts, which is conservative for averages over several picks per prompt.
A claim ("PPO > SFT") states both numbers with their intervals and whether the intervals separate;
one policy stage against another also states the paired comparison on the prompts both answered
(eval_samples.jsonl, matched by prompt: Newcombe's interval on the difference, McNemar's exact p).
A claim "holds" only when that test supports it (paired interval above 0; without a pairing, the
intervals separating), "not shown" when A is ahead but the test does not support it, else "no".
A stage that has not run gets a section that says so; a stage still running shows its curves so far.
The report is built once as a list of sections of blocks (text, table, plot, samples), then rendered
twice by render.py: markdown (plots as PNG files beside it) and HTML (plots inline as base64, every
text escaped, no scripts, no external files). The plots are plots.py's.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..common import UserError, atomic_write_bytes, atomic_write_text
from ..eval.stats import paired_comparison, wilson_interval
from ..world import STYLES
from . import plots
from .config import ReportConfig
from .render import render_html, render_markdown

STAGES = ("pretrain", "sft", "prefs", "rm", "bon", "ppo", "overopt", "grpo", "dpo", "prm", "search")
POLICIES = ("sft", "ppo", "overopt", "grpo", "dpo")  # stages judged by the shared eval protocol
TITLES = {"pretrain": "Pretraining", "sft": "Supervised fine-tuning (SFT)", "prefs": "Preference comparisons",
          "rm": "Reward model", "bon": "Best-of-n", "ppo": "PPO-RLHF", "overopt": "Over-optimization",
          "grpo": "GRPO (verifiable reward)", "dpo": "DPO", "prm": "Process and outcome reward models",
          "search": "Selection and PRM-guided search"}
SEARCH_METHODS = ("prm", "orm", "rm", "majority", "prm_search")

# --- reading the run directory -------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL file ([] when absent). A cut-off last line is what a stage that is still
    writing leaves, so it is skipped; a bad line anywhere else is an error naming file:line."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):
                break
            raise UserError(f"{path}:{i}: not valid JSON ({e.msg}), expected one JSON object per line") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def series(rows: list[dict], key: str, x: str = "step") -> list[tuple[float, float]]:
    """(x, value) points of one metric, sorted by x, the last row winning on a repeated x. Rows without
    it, or with a non-finite value (the metrics logger writes those as strings), are left out."""
    def finite(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    return sorted({r[x]: r[key] for r in rows if finite(r.get(x)) and finite(r.get(key))}.items())


class Stage:
    """One stage's directory: its summary (None when the stage has not finished) and typed access."""

    def __init__(self, run_dir: Path, name: str):
        self.name, self.dir = name, run_dir / name
        self.path = self.dir / "summary.json"
        self.summary: dict | None = None
        if self.path.is_file():
            try:
                self.summary = json.loads(self.path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise UserError(f"{self.path}:{e.lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(self.summary, dict):
                raise UserError(f"{self.path}: expected a JSON object of summary keys")

    @property
    def ran(self) -> bool:
        return self.summary is not None

    def get(self, key: str, default=None):
        return (self.summary or {}).get(key, default)

    def num(self, key: str) -> float | None:
        """A number from the summary; None when absent; an error naming file and key when not a number."""
        value = self.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{self.path}: {key}: expected a number, got {value!r}")
        return value

    def interval(self, key: str) -> list[float] | None:
        value = self.get(key)
        if value is None:
            return None
        if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)):
            raise UserError(f"{self.path}: {key}: expected [lo, hi], got {value!r}")
        return value

    def rows(self, key: str, fields: tuple[str, ...]) -> list[dict]:
        """A list-of-objects summary key (bon's by_n, overopt's points), each row checked for `fields`."""
        value = self.get(key, [])
        if not isinstance(value, list):
            raise UserError(f"{self.path}: {key}: expected a list of objects, got {value!r}")
        for i, row in enumerate(value):
            if not isinstance(row, dict) or any(not isinstance(row.get(f), (int, float)) for f in fields):
                raise UserError(f"{self.path}: {key}[{i}]: expected an object with numbers {', '.join(fields)}, "
                                f"got {row!r}")
        return value

    def pass_key(self, prefix: str = "eval") -> str | None:
        """The pass@k key (k is an eval setting; pass@1, the T = 1 accuracy, has a row of its own)."""
        return next((k for k in (self.summary or {}) if k.startswith(f"{prefix}/pass@") and k != f"{prefix}/pass@1"),
                    None)

    def families(self, prefix: str = "eval") -> dict[str, float]:
        head = f"{prefix}/accuracy/"
        return {k[len(head):]: self.num(k) for k in (self.summary or {}) if k.startswith(head)}


# --- formatting (the tests parse these back) -------------------------------------------------------


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def interval(iv: list[float] | None) -> str:
    return "—" if iv is None else f"[{100 * iv[0]:.1f}, {100 * iv[1]:.1f}] %"


def number(x) -> str:
    if x is None:
        return "—"
    if isinstance(x, str):
        return x
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) >= 1000):
        return f"{int(x):,}"
    return f"{x:.3f}" if abs(x) < 1e4 else f"{x:,.0f}"


def seconds(x: float | None) -> str:
    return "—" if x is None else (f"{x:.1f} s" if x < 60 else f"{x / 60:.1f} min")


# --- the report as blocks ----------------------------------------------------------------------------


@dataclass
class Section:
    id: str
    title: str
    blocks: list[tuple] = field(default_factory=list)

    def text(self, s: str) -> None:
        self.blocks.append(("text", s))

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(("table", header, rows))

    def plot(self, name: str, png: bytes, caption: str) -> None:
        self.blocks.append(("plot", name, png, caption))

    def samples(self, items: list[tuple[str, str, str]]) -> None:
        """(label, prompt, response) triples; prompt and response are untrusted (model output, data files)."""
        if items:
            self.blocks.append(("samples", items))


def figures_table(sec: Section, st: Stage, spec: list[tuple[str, str, callable]]) -> None:
    """figure | value | summary key, for the keys of `spec` the summary has."""
    def value(key: str, fmt):
        if fmt is interval:
            return st.interval(key)
        return st.get(key) if isinstance(st.get(key), str) else st.num(key)  # a few keys are names

    rows = [[label, fmt(value(key, fmt)), f"`{key}`"] for label, key, fmt in spec if key and st.get(key) is not None]
    if rows:
        sec.table(["figure", "value", "summary key"], rows)


def policy_spec(st: Stage, prefix: str = "eval", who: str = "") -> list[tuple[str, str, callable]]:
    p = f"{prefix}/"
    return [(f"{who}accuracy (greedy)", p + "accuracy", pct), (f"{who}95 % interval", p + "accuracy_ci95", interval),
            (f"{who}gold reward (T = 1)", p + "gold_reward", number), (f"{who}well-formed", p + "format_ok", pct),
            (f"{who}{(st.pass_key(prefix) or 'pass@k').split('/')[-1]}", st.pass_key(prefix), pct),
            (f"{who}pass@1 (T = 1)", p + "pass@1", pct), (f"{who}mean length (words, T = 1)", p + "length", number),
            (f"{who}entropy (nats/response, T = 1)", p + "entropy", number),
            (f"{who}KL to SFT", p + "kl_to_sft", number), (f"{who}eval prompts", p + "n_prompts", number)]


def policy_samples(sec: Section, st: Stage, count: int) -> None:
    """One eval sample per family, right and wrong answers alternating (the first right one of the
    first family, the first wrong one of the next, ... falling back to the family's first), then the
    rest in file order, up to `count`: failures are worth reading too."""
    rows = read_jsonl(st.dir / "eval_samples.jsonl")
    families = list(dict.fromkeys(r.get("family") for r in rows))
    picked = []
    for k, family in enumerate(families):
        mine = [i for i, r in enumerate(rows) if r.get("family") == family]
        picked.append(next((i for i in mine if rows[i].get("correct") is (k % 2 == 0)), mine[0]))
    order = picked + [i for i in range(len(rows)) if i not in set(picked)]
    items = []
    for i in order[:count]:
        r = rows[i]
        verdict = {True: "correct", False: "wrong"}.get(r.get("correct"), "")
        items.append((" · ".join(str(x) for x in (r.get("family"), verdict) if x), str(r.get("prompt", "")),
                      str(r.get("response", ""))))
    sec.samples(items)


def not_run(sec: Section, st: Stage) -> bool:
    """Says so when the stage has no summary; True when there is nothing more to show."""
    if st.ran:
        return False
    if st.dir.is_dir():
        sec.text(f"Not finished: {st.dir.name}/ exists but has no summary.json (running, stopped or failed); "
                 "curves so far are shown where there are any.")
        return False
    sec.text(f"Not run: there is no {st.dir.name}/ in this run directory.")
    return True


# --- claims --------------------------------------------------------------------------------------------


def claim(name: str, a: tuple, b: tuple, strict: bool = True, pair: dict | None = None) -> list[str]:
    """a, b = (label, value, [lo, hi] or None); pair = paired_comparison(A, B) on shared prompts, or None.
    The verdict is the test's, not the point estimates': a lead inside the noise is "not shown", not "yes".
    With a pairing the paired interval decides (the sharper test); without one, whether A's interval
    lies above B's."""
    (la, va, ia, *why_a), (lb, vb, ib, *why_b) = a, b
    if va is None or vb is None:
        missing = " and ".join(f"{l} {(why or ['not run'])[0]}" for l, v, why in ((la, va, why_a), (lb, vb, why_b))
                               if v is None)
        return [name, f"{la}: {pct(va)}", f"{lb}: {pct(vb)}", f"not measured ({missing})"]
    if ia is None or ib is None:
        sep = "no intervals"
    elif ia[0] > ib[1] or ib[0] > ia[1]:
        sep = "the 95 % intervals separate"
    else:
        sep = "the 95 % intervals overlap"
    if pair:
        ahead, shown = (pair["difference"] > 0 if strict else pair["difference"] >= 0), pair["ci95"][0] > 0
    else:
        ahead, shown = (va > vb if strict else va >= vb), ia is not None and ib is not None and ia[0] > ib[1]
    verdict = "holds" if shown else "not shown" if ahead else "no"
    return [name, f"{la}: {pct(va)} {interval(ia)}", f"{lb}: {pct(vb)} {interval(ib)}",
            f"{verdict}; {sep}{paired_clause(pair) if pair else ''}"]


def eval_correct(st: Stage) -> dict[str, bool] | str:
    """{prompt: greedy answer correct} from the stage's eval_samples.jsonl, or why it cannot be paired."""
    name = f"{st.name}/eval_samples.jsonl"
    rows = read_jsonl(st.dir / "eval_samples.jsonl")
    if not rows:
        return f"{name} is missing or empty"
    out: dict[str, bool] = {}
    for i, r in enumerate(rows, 1):
        if not isinstance(r.get("prompt"), str) or not isinstance(r.get("correct"), bool):
            return f'{name} row {i} has no text "prompt" or no true/false "correct"'
        if r["prompt"] in out:
            return f"{name} row {i} repeats a prompt"
        out[r["prompt"]] = r["correct"]
    return out


def paired(s: dict[str, Stage], first: str, second: str, notes: list[str]) -> dict | None:
    """paired_comparison of two policy stages (A = first) on their shared eval prompts; None when the
    claim is not measured, and None plus a note in `notes` when the eval samples cannot be paired
    (missing, or different prompt sets)."""
    if s[first].num("eval/accuracy") is None or s[second].num("eval/accuracy") is None:
        return None  # the claim itself says "not measured"
    label = f"{first.upper()} vs {second.upper()}"
    ours, theirs = eval_correct(s[first]), eval_correct(s[second])
    why = next((x for x in (ours, theirs) if isinstance(x, str)), None)
    if why is None and ours.keys() != theirs.keys():
        why = (f"{first}/eval_samples.jsonl and {second}/eval_samples.jsonl answer different prompts "
               f"({len(ours)} and {len(theirs)}, {len(ours.keys() & theirs.keys())} shared)")
    if why:
        notes.append(f"{label}: no paired comparison, {why}.")
        return None
    return paired_comparison([ours[q] for q in ours], [theirs[q] for q in ours])


def paired_clause(r: dict) -> str:
    """A paired comparison as a clause for the claim ("; paired on the same 500 prompts: ...")."""
    signed = lambda x: f"{100 * x:+.1f}".replace("-", "−")
    lo, hi = r["ci95"]
    p = r["p_mcnemar"]
    return (f"; paired on the same {r['n']} prompts: {signed(r['difference'])} points [{signed(lo)}, {signed(hi)}], "
            f"b = {r['b']}, c = {r['c']}, McNemar p = {f'{p:.2g}' if p >= 0.001 else f'{p:.1e}'}")


def bon_pick(st: Stage, want: int) -> dict | None:
    by_n = st.rows("by_n", ("n", "kl", "d", "proxy", "gold", "accuracy"))
    if not by_n:
        return None
    return next((r for r in by_n if r["n"] == want), max(by_n, key=lambda r: r["n"]))


def bon_interval(st: Stage, row: dict | None) -> list[float] | None:
    prompts = st.num("prompts")
    return wilson_interval(round(row["accuracy"] * prompts), int(prompts)) if row and prompts else None


def search_table(st: Stage, key: str) -> dict[str, dict[str, float | None]]:
    """search's {method: {N: value}} tables (accuracy, tokens, accuracy_ci95's values are checked where used)."""
    table = st.get(key) or {}
    if not isinstance(table, dict) or not all(
            isinstance(m, dict) and all(str(n).isdigit() and (v is None or (isinstance(v, (int, float))
                                                                       and not isinstance(v, bool))) for n, v in m.items())
            for m in table.values()):
        raise UserError(f"{st.path}: {key}: expected {{method: {{N: number or null}}}} with N as strings, got {table!r:.200}")
    return table


def search_point(st: Stage, method: str, n: str) -> tuple[str, float | None, list[float] | None]:
    acc = search_table(st, "accuracy").get(method, {}).get(n)
    iv = (st.get("accuracy_ci95") or {}).get(method, {}).get(n)
    if iv is not None and not (isinstance(iv, list) and len(iv) == 2 and all(isinstance(v, (int, float)) for v in iv)):
        raise UserError(f"{st.path}: accuracy_ci95.{method}.{n}: expected [lo, hi], got {iv!r}")
    if acc is not None and iv is None and st.num("n_prompts"):
        iv = wilson_interval(round(acc * st.num("n_prompts")), int(st.num("n_prompts")))
    return (f"{method} (N={n})", acc, iv)


def claims(s: dict[str, Stage], cfg: ReportConfig, notes: list[str] | None = None) -> list[list[str]]:
    """The claims table's rows; why a stage-vs-stage claim has no paired comparison goes to `notes`."""
    notes = [] if notes is None else notes

    def pol(name: str, prefix: str = "eval", label: str | None = None):
        st = s[name]
        value = st.num(f"{prefix}/accuracy")
        # a stage trained on a user's file has no world figure to compare: none (a prompts file), or
        # the accuracy on the file's own held-out answers (grpo --reward FILE)
        why = []
        if st.ran and value is None:
            why = ["ran without a world evaluation (a prompts file)"]
        elif st.ran and prefix == "eval" and st.get("reward") == "answer":
            value, why = None, ["measured on its own file's answers, not the world's eval set"]
        return (label or name.upper(), value, st.interval(f"{prefix}/accuracy_ci95"), *why)

    out = [claim("SFT > base (few-shot)", pol("sft"), pol("sft", "base/eval", "base"))]
    bon = s["bon"]
    best, one = bon_pick(bon, cfg.bon_n), bon_pick(bon, 1)
    n = best["n"] if best else cfg.bon_n
    out.append(claim(f"best-of-{n} > best-of-1", (f"best-of-{n}", best and best["accuracy"], bon_interval(bon, best)),
                     ("best-of-1", one and one["accuracy"], bon_interval(bon, one))))
    for first, second in (("ppo", "sft"), ("grpo", "ppo"), ("grpo", "sft"), ("dpo", "sft")):
        out.append(claim(f"{first.upper()} > {second.upper()}", pol(first), pol(second),
                         pair=paired(s, first, second, notes)))
    acc = search_table(s["search"], "accuracy")
    ns = sorted({k for m in ("prm", "orm", "majority") for k, v in acc.get(m, {}).items() if v is not None}, key=int)
    top = ns[-1] if ns else "N"
    out += [claim("PRM ≥ ORM (best-of-N)", search_point(s["search"], "prm", top), search_point(s["search"], "orm", top),
                  strict=False),
            claim("ORM ≥ majority vote", search_point(s["search"], "orm", top),
                  search_point(s["search"], "majority", top), strict=False)]
    return out


# --- sections --------------------------------------------------------------------------------------------


def policy_other(st: Stage) -> str:
    """The overview's last column for a policy: the RM's score (beside SFT's on a prompts file, which
    has no gold), and the held-out loss of sft on a user's file."""
    out = []
    if st.num("eval/proxy_score") is not None:
        sft = st.num("eval/sft_proxy_score")
        out.append(f"proxy score {number(st.num('eval/proxy_score'))}" + (f" (SFT {number(sft)})" if sft is not None else ""))
    if st.num("heldout/loss") is not None:
        out.append(f"held-out loss {number(st.num('heldout/loss'))} on its file")
    if st.get("reward") == "answer":
        out.append("accuracy: its file's held-out answers, not the world's eval set")
    return "; ".join(out)


def overview(s: dict[str, Stage], cfg: ReportConfig) -> Section:
    sec = Section("overview", "Overview")
    header = ["stage", "accuracy", "95 % interval", "gold reward", "KL to SFT", "wall time", "other"]
    rows, total = [], 0.0
    other = {"pretrain": ("val loss", "val_loss", number), "prefs": ("pairs", "prefs/pairs", number),
             "rm": ("held-out pair accuracy", "eval/accuracy", pct),
             "prm": ("PRM step accuracy", "prm/eval/step_accuracy", pct)}
    for name in STAGES:
        st = s[name]
        wall = st.num("wall_seconds")
        total += wall or 0.0
        if name == "sft" and st.ran:
            rows.append(["base (few-shot)", pct(st.num("base/eval/accuracy")), interval(st.interval("base/eval/accuracy_ci95")),
                         number(st.num("base/eval/gold_reward")), "—", "—", "measured by the sft stage"])
        if not st.ran:
            rows.append([name, "not run", "—", "—", "—", "—", ""])
        elif name in POLICIES:
            rows.append([name, pct(st.num("eval/accuracy")), interval(st.interval("eval/accuracy_ci95")),
                         number(st.num("eval/gold_reward")), number(st.num("eval/kl_to_sft")), seconds(wall),
                         policy_other(st)])
        elif name == "bon" and bon_pick(st, cfg.bon_n):
            r = bon_pick(st, cfg.bon_n)
            rows.append([f"bon (best-of-{r['n']})", pct(r["accuracy"]), interval(bon_interval(st, r)), number(r["gold"]),
                         number(r["kl"]), seconds(wall), f"proxy score {number(r['proxy'])}"])
        elif name == "search":
            row = [name, "—", "—", "—", "—", seconds(wall), ""]
            acc = search_table(st, "accuracy")
            if acc.get("prm"):
                n = max(acc["prm"], key=int)
                row[-1] = f"PRM best-of-{n} accuracy {pct(acc['prm'][n])}"
            rows.append(row)
        else:
            label, key, fmt = other.get(name, ("", "", number))
            note = f"{label} {fmt(st.num(key))}" if key and st.num(key) is not None else ""
            if name == "pretrain" and st.get("imported_from"):
                note = f"imported from {st.get('imported_from')} ({st.get('architecture')}, chat format: {st.get('chat')})"
            rows.append([name, "—", "—", "—", "—", seconds(wall), note])
    rows.append(["total", "", "", "", "", seconds(total), "sum of the stages' wall_seconds"])
    sec.table(header, rows)
    sec.text("Accuracy: greedy, on the world's fixed held-out eval set, with its 95 % Wilson interval; gold reward: "
             "mean over k samples at T = 1 (eval protocol). Best-of-n: the RM's pick among n samples at T = 1, its KL "
             "the analytic log n − (n − 1)/n, its interval taken over the prompts.")
    sampling_table(sec, s)
    return sec


def styles_in(keys, head: str) -> list[str]:
    """The style names among `keys` that start with `head`, in the world's order, unknown ones after."""
    found = {k[len(head):] for k in keys if k.startswith(head)}
    return [x for x in (*STYLES, "other") if x in found] + sorted(found - {*STYLES, "other"})


def sampling_table(sec: Section, s: dict[str, Stage]) -> None:
    """Greedy accuracy beside what each policy's T = 1 samples are like: greedy decoding shows the mode,
    while RL and DPO move the whole distribution (which styles, how long, how spread), which this shows.
    Left out when no summary has these keys (runs from before the eval protocol recorded them)."""
    rows = ([("base (few-shot)", s["sft"], "base/eval")] if s["sft"].ran else []) + [
        (name, s[name], "eval") for name in POLICIES if s[name].ran]
    styles = styles_in({k.replace("base/eval/", "eval/", 1) for _, st, _ in rows for k in st.summary}, "eval/style/")
    if not styles and all(st.get(f"{p}/{k}") is None for _, st, p in rows for k in ("pass@1", "length", "entropy")):
        return
    sec.text("What the policies' samples at T = 1 are like (eval protocol, same prompts): pass@1 = their accuracy, "
             "mean length in words, entropy in nats per response, and the share of responses in each style "
             "(`eval/style/<style>`; base: `base/eval/…`), beside greedy accuracy:")
    sec.table(["stage", "accuracy (greedy)", "pass@1 (T = 1)", "length (words)", "entropy (nats)", *styles],
              [[label, pct(st.num(f"{p}/accuracy")), pct(st.num(f"{p}/pass@1")), number(st.num(f"{p}/length")),
                number(st.num(f"{p}/entropy")), *(pct(st.num(f"{p}/style/{x}")) for x in styles)] for label, st, p in rows])


def section_pretrain(st: Stage, cfg: ReportConfig, sec: Section, **_) -> None:
    figures_table(sec, st, [("validation loss (nats/token)", "val_loss", number), ("validation bits per byte", "val_bpb", number),
                            ("tokens seen", "tokens_seen", number), ("parameters", "params", number),
                            ("steps", "steps", number), ("wall time", "wall_seconds", seconds)])
    rows = read_jsonl(st.dir / "metrics.jsonl")
    train = series(rows, "train/loss")
    val = sorted(dict(series(rows, "val/loss_estimate") + series(rows, "val/loss")).items())  # the full split wins
    if train or val:
        sec.plot("pretrain-loss", plots.pretrain_loss(train, val, cfg.dpi),
                 "Pretraining loss: train/loss per logged step; validation estimates and the final full split.")


def section_sft(st: Stage, cfg: ReportConfig, sec: Section, s: dict[str, Stage]) -> None:
    figures_table(sec, st, policy_spec(st, "base/eval", "base: ") + policy_spec(st) +
                  [("final training loss", "train/final_loss", number), ("steps", "steps", number),
                   # --data FILE: its held-out slice (sft.heldout_fraction), never trained on
                   ("trained conversations", "data/train_conversations", number),
                   ("held-out conversations", "heldout/conversations", number),
                   ("held-out loss (nats/token)", "heldout/loss", number),
                   ("held-out accuracy (greedy)", "heldout/accuracy", pct),
                   ("held-out 95 % interval", "heldout/accuracy_ci95", interval)])
    columns = {"base (few-shot)": st.families("base/eval")} | {n: s[n].families() for n in POLICIES if s[n].ran}
    columns = {k: v for k, v in columns.items() if v}
    families = sorted({f for v in columns.values() for f in v})
    if families:
        sec.text("Greedy accuracy per task family, every policy stage (`eval/accuracy/<family>`; base: `base/eval/…`):")
        sec.table(["family", *columns], [[f, *(pct(v.get(f)) for v in columns.values())] for f in families])
        sec.plot("accuracy-by-family", plots.family_bars(families, {k: [v.get(f) for f in families] for k, v in columns.items()},
                                                         cfg.dpi), "Accuracy per task family: base few-shot, SFT and the RL/DPO policies.")
    policy_samples(sec, st, cfg.samples)


def section_prefs(st: Stage, cfg: ReportConfig, sec: Section, **_) -> None:
    figures_table(sec, st, [("ranked prompts", "prefs/rows", number), ("responses", "prefs/responses", number),
                            ("pairs", "prefs/pairs", number), ("labeler agrees with gold", "prefs/labeler_gold_agreement", pct),
                            ("responses correct", "prefs/response_accuracy", pct), ("mean gold", "prefs/gold_mean", number)])


RM_FIGURES = [("held-out pair accuracy (vs labels)", "eval/accuracy"),
              ("correct-vs-wrong pair accuracy", "eval/correct_vs_wrong_accuracy"),
              ("labeler-gold agreement (ceiling)", "eval/labeler_gold_agreement"),
              ("policy accuracy (same prompts)", "policy/accuracy"), ("Spearman with gold", "eval/gold_spearman")]


def section_rm(st: Stage, cfg: ReportConfig, sec: Section, **_) -> None:
    figures_table(sec, st, [(label, key, number if "spearman" in key else pct) for label, key in RM_FIGURES]
                  + [("held-out pairs", "eval/pairs", number), ("steps", "steps", number)])
    bars = {label: st.num(key) for label, key in RM_FIGURES if st.num(key) is not None}
    if bars:
        sec.plot("rm", plots.rm_bars(bars, cfg.dpi), "Reward model on held-out comparisons: accuracy against the labels, "
                 "on pairs where exactly one response is right, the labeler's own agreement with gold (a ceiling), "
                 "and the Spearman correlation of RM score with gold.")


def section_bon(st: Stage, cfg: ReportConfig, sec: Section, **_) -> None:
    by_n = st.rows("by_n", ("n", "kl", "d", "proxy", "gold", "accuracy"))
    if by_n:
        sec.table(["n", "KL", "d = √KL", "proxy", "gold", "accuracy"],
                  [[str(r["n"]), number(r["kl"]), number(r["d"]), number(r["proxy"]), number(r["gold"]), pct(r["accuracy"])]
                   for r in by_n])
    figures_table(sec, st, [("fit α", "fit/alpha", number), ("fit β", "fit/beta", number), ("fit R²", "fit/r2", number),
                            ("gold at n = 1", "gold/n1", number), ("prompts", "prompts", number)])
    fit = {"alpha": st.num("fit/alpha"), "beta": st.num("fit/beta"), "r2": st.num("fit/r2")}
    gold_n1 = st.num("gold/n1") if st.num("gold/n1") is not None else next((r["gold"] for r in by_n if r["n"] == 1), None)
    if by_n:
        sec.text("Fitted gain over the policy (Gao et al. 2023, best-of-n form): gold(n) − gold(1) = d (α − β d).")
        sec.plot("bon", plots.best_of_n(by_n, fit if None not in (fit["alpha"], fit["beta"]) else None,
                                        gold_n1 if gold_n1 is not None else 0.0, cfg.dpi),
                 "Best-of-n: gold (left axis, with the fit) and proxy (right axis) of the pick vs d.")
    items = []
    for r in read_jsonl(st.dir / "samples.jsonl")[: min(2, cfg.samples)]:
        best = next((k for k in r if k.startswith("best_of_")), None)
        items.append((f"first sample · gold {number(r.get('first_gold'))}, proxy {number(r.get('first_proxy'))}",
                      str(r.get("prompt", "")), str(r.get("first", ""))))
        if best:
            items.append((f"{best.replace('_', '-')} · gold {number(r.get('best_gold'))}, proxy {number(r.get('best_proxy'))}",
                          str(r.get("prompt", "")), str(r[best])))
    sec.samples(items)


RL_CURVES = ["objective/scores", "objective/kl", "gold/reward", "gold/accuracy", "hack/length", "hack/repetition"]


def rl_curves(st: Stage, cfg: ReportConfig, sec: Section, keys: list[str]) -> None:
    rows = [r for r in read_jsonl(st.dir / "metrics.jsonl") if "objective/scores" in r]
    if rows:
        x = "episode" if all("episode" in r for r in rows) else "step"
        sec.plot(f"{st.name}-curves", plots.curves({k: series(rows, k, x) for k in keys},
                                                   "rollouts" if x == "episode" else "step", cfg.dpi),
                 f"{st.name}: training metrics per update (TRL names; gold/* is the world's gold reward of the same "
                 f"rollouts, hack/* the length and repetition of the responses), over {'rollouts' if x == 'episode' else 'steps'}.")


def section_policy(st: Stage, cfg: ReportConfig, sec: Section, s: dict[str, Stage]) -> None:
    """ppo, grpo and dpo: the eval protocol's figures, the stage's training curves, samples."""
    extra = {"ppo": [("proxy score (RM, eval set)", "eval/proxy_score", number), ("updates", "updates", number)],
             "grpo": [("updates", "updates", number), ("reward", "reward", number)],
             "dpo": [("held-out pair accuracy (implicit reward)", "eval_rewards/accuracies", pct),
                     ("held-out reward margin", "eval_rewards/margins", number), ("held-out loss", "eval_loss", number),
                     ("steps", "steps", number)]}[st.name]
    figures_table(sec, st, policy_spec(st) + extra + [("wall time", "wall_seconds", seconds)])
    if st.name == "dpo":
        rows = read_jsonl(st.dir / "metrics.jsonl")
        if series(rows, "loss"):
            keys = ["loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected"]
            sec.plot("dpo-curves", plots.curves({k: series(rows, k) for k in keys}, "step", cfg.dpi),
                     "DPO training metrics (TRL names): loss, implicit reward margin and pair accuracy, chosen and rejected rewards.")
    else:
        rl_curves(st, cfg, sec, RL_CURVES)
    if st.name == "grpo":
        gold = {n: series(read_jsonl(s[n].dir / "metrics.jsonl"), "gold/reward", "episode") for n in ("ppo", "grpo")}
        finals = {n: s[n].num("eval/gold_reward") for n in POLICIES if s[n].num("eval/gold_reward") is not None}
        if any(gold.values()) or finals:
            sec.plot("grpo-vs-ppo", plots.gold_comparison({k: v for k, v in gold.items() if v}, finals, cfg.dpi),
                     "GRPO vs PPO on gold: the gold reward of the training rollouts (left) and the eval protocol's "
                     "gold reward of each policy (right).")
    policy_samples(sec, st, cfg.samples)


def overopt_samples(sec: Section, points: list[dict], count: int) -> None:
    """The held-out responses where the proxy peaks (what the policy learned to say to please the RM),
    then, for contrast, those of the first point (the SFT policy, update 0)."""
    scored = [p for p in points if isinstance(p.get("proxy"), (int, float))]
    if not scored:
        return
    peak, first = max(scored, key=lambda p: p["proxy"]), points[0]
    score = lambda v: number(v) if isinstance(v, (int, float)) else "—"
    for p, what in [(peak, "the proxy's peak")] + ([(first, "the first point, for contrast")] if first is not peak else []):
        items = [x for x in p.get("samples") or [] if isinstance(x, dict)][:count]
        if items:
            sec.text(f"Held-out responses at {what}: update {p['step']}, d = {number(p['d'])}, "
                     f"mean proxy {score(p.get('proxy'))}, mean gold {number(p['gold'])}.")
            sec.samples([(f"update {p['step']} · proxy {score(x.get('proxy'))}, gold {score(x.get('gold'))}",
                          str(x.get("prompt", "")), str(x.get("response", ""))) for x in items])


def section_overopt(st: Stage, cfg: ReportConfig, sec: Section, s: dict[str, Stage]) -> None:
    points = sorted(st.rows("points", ("step", "kl", "d", "gold")), key=lambda p: p["step"])
    if points:
        styles = styles_in({k for p in points for k in p}, "style/")
        sec.table(["update", "KL", "d = √KL", "proxy", "gold", "accuracy", "length (words)", *styles],
                  [[str(p["step"]), number(p["kl"]), number(p["d"]), number(p.get("proxy")), number(p["gold"]),
                    pct(p.get("accuracy")), number(p.get("length")), *(pct(p.get(f"style/{x}")) for x in styles)]
                   for p in points])
    figures_table(sec, st, [("fit α", "fit/alpha", number), ("fit β", "fit/beta", number), ("fit R²", "fit/r2", number),
                            ("gold at d = 0", "fit/gold_at_d0", number), ("gold peak at d", "gold_peak_d", number)]
                  + policy_spec(st) + [("wall time", "wall_seconds", seconds)])
    fit = None
    if None not in (st.num("fit/alpha"), st.num("fit/beta"), st.num("fit/gold_at_d0")):
        fit = {"alpha": st.num("fit/alpha"), "beta": st.num("fit/beta"), "r2": st.num("fit/r2") or 0.0,
               "gold_at_d0": st.num("fit/gold_at_d0")}
    bon = s["bon"]
    bon_rows = bon.rows("by_n", ("n", "kl", "d", "proxy", "gold", "accuracy"))
    bon_fit = ({"alpha": bon.num("fit/alpha"), "beta": bon.num("fit/beta")}
               if None not in (bon.num("fit/alpha"), bon.num("fit/beta")) else None)
    bon_n1 = bon.num("gold/n1") if bon.num("gold/n1") is not None else next((r["gold"] for r in bon_rows if r["n"] == 1), None)
    if points:
        sec.text("Fitted forms (Gao et al. 2023): RL gold = gold(0) + d (α − β log d); best-of-n gold = gold(1) + d (α − β d).")
        sec.plot("overopt", plots.overoptimization(points, fit, st.num("gold_peak_d"), bon_rows or None, bon_fit, bon_n1, cfg.dpi),
                 "Over-optimization: held-out proxy (RM score), gold (with the RL fit and best-of-n for comparison) and "
                 "mean response length vs d = √KL to SFT, one marker per held-out point coloured by update"
                 + ("; the ring marks the proxy's peak, whose responses follow." if all("proxy" in p for p in points) else "."))
        overopt_samples(sec, points, cfg.samples)
    rl_curves(st, cfg, sec, RL_CURVES)
    policy_samples(sec, st, cfg.samples)


def section_prm(st: Stage, cfg: ReportConfig, sec: Section, **_) -> None:
    figures_table(sec, st, [("PRM step accuracy", "prm/eval/step_accuracy", pct), ("PRM step AUROC", "prm/eval/step_auroc", number),
                            ("PRM outcome AUROC (min)", "prm/eval/outcome_auroc", number),
                            ("ORM outcome AUROC", "orm/eval/outcome_auroc", number),
                            ("PRM best-of-k accuracy", "prm/eval/best_of_k", pct), ("ORM best-of-k accuracy", "orm/eval/best_of_k", pct),
                            ("pass@k (oracle)", "eval/pass@k", pct), ("step labels", "data/labels", number),
                            ("wall time", "wall_seconds", seconds)])


def section_search(st: Stage, cfg: ReportConfig, sec: Section, **_) -> None:
    acc, tokens = search_table(st, "accuracy"), search_table(st, "tokens")
    ns = sorted({n for m in acc.values() for n in m}, key=int)
    methods = [m for m in SEARCH_METHODS if m in acc] + [m for m in acc if m not in SEARCH_METHODS]
    if ns:
        oracle = st.get("oracle") or {}
        sec.text(f"Accuracy of each selection method on {number(st.num('n_prompts'))} held-out prompts "
                 f"({number(st.num('samples_per_prompt'))} samples each), `accuracy[method][N]`; tokens generated "
                 "per prompt below (prm_search at best-of-N's budget).")
        sec.table(["method", *(f"N={n}" for n in ns)], [[m, *(pct(acc[m].get(n)) for n in ns)] for m in methods]
                  + ([["oracle (pass@N)", *(pct(oracle.get(n)) for n in ns)]] if oracle else []))
        sec.table(["tokens", *(f"N={n}" for n in ns)], [[m, *(number(tokens.get(m, {}).get(n)) for n in ns)] for m in methods])
        sec.plot("search", plots.search_accuracy(acc, tokens, oracle or None, cfg.dpi),
                 "Best-of-N by PRM, ORM, preference RM and majority vote, and PRM-guided search, vs N and vs tokens.")
    items = []
    for r in read_jsonl(st.dir / "picks.jsonl")[: min(2, cfg.samples)]:
        for m in ("prm", "orm", "prm_search"):
            if isinstance(r.get(m), dict):
                items.append((f"{m} pick · {'correct' if r[m].get('correct') else 'wrong'}", str(r.get("prompt", "")),
                              str(r[m].get("response", ""))))
    sec.samples(items)


SECTIONS = {"pretrain": section_pretrain, "sft": section_sft, "prefs": section_prefs, "rm": section_rm,
            "bon": section_bon, "ppo": section_policy, "overopt": section_overopt, "grpo": section_policy,
            "dpo": section_policy, "prm": section_prm, "search": section_search}


def build(run_dir: Path, cfg: ReportConfig) -> list[Section]:
    stages = {name: Stage(run_dir, name) for name in STAGES}
    top = overview(stages, cfg)
    top.text("Claims, each with both numbers and their 95 % intervals. \"holds\": a test supports it, the paired "
             "comparison on the same prompts where both stages' eval samples pair up (its 95 % interval of A − B "
             "above 0), otherwise the two intervals separating; \"not shown\": A is ahead but the test does not "
             "support it; \"no\": A is not ahead.")
    notes: list[str] = []
    rows = claims(stages, cfg, notes)
    top.table(["claim", "A", "B", "holds?"], rows)
    if notes or any("; paired on" in r[3] for r in rows):
        top.text("Stage-vs-stage claims add a paired comparison where both stages' eval_samples.jsonl hold the "
                 "same prompts: accuracy A − B in points with Newcombe's 95 % interval for paired proportions, "
                 "b = prompts A gets right and B wrong, c = the reverse, and McNemar's exact two-sided p. "
                 "It is the sharper test: both policies answer the same prompts.")
    for note in notes:
        top.text(note)
    sections = [top]
    for name in STAGES:
        sec = Section(name, f"{TITLES[name]} ({name})")
        if not not_run(sec, stages[name]):
            SECTIONS[name](stages[name], cfg, sec, s=stages)
        sections.append(sec)
    return sections


def write_report(run_dir: str | Path, cfg: ReportConfig | None = None) -> tuple[Path, Path]:
    """Write RUN/report.md (+ RUN/report-*.png) and a self-contained RUN/report.html; return their paths."""
    run_dir, cfg = Path(run_dir), cfg or ReportConfig()
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a run directory (expected a directory with stage folders such as sft/)")
    if cfg.samples < 0 or cfg.dpi < 10 or cfg.bon_n < 1:
        raise UserError(f"report: samples must be >= 0, dpi >= 10 and bon_n >= 1 (got {cfg.samples}, {cfg.dpi}, {cfg.bon_n})")
    sections = build(run_dir, cfg)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = f"gptstack report card: {run_dir.resolve().name}"
    sections[0].blocks.insert(0, ("text", f"Run directory `{run_dir}`, written {when} from the stages' summary.json files."))
    for sec in sections:
        for block in sec.blocks:
            if block[0] == "plot":
                atomic_write_bytes(run_dir / f"report-{block[1]}.png", block[2])
    md, page = run_dir / "report.md", run_dir / "report.html"
    atomic_write_text(md, render_markdown(title, sections))
    atomic_write_text(page, render_html(title, sections))
    return md, page
