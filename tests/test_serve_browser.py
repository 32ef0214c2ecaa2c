"""The page in a real browser: Debian's Chromium (headless), driven by Playwright, against a real
`gptstack serve` process. It chats one turn and sees the reply arrive in pieces, renders hostile
model output (<script>, <img onerror>) as text with no dialog, compares two stages with gold and
RM figures, ranks 3 items by keyboard (and undoes one), and finds exactly those rows in SQLite;
a screenshot of each view lands in the test's tmp dir. Then those labels train a reward model
with `gptstack rm --prefs RUN/feedback.sqlite`.

.ci/run installs /usr/bin/chromium, so in CI this never skips."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from serve_run import XSS, XSS_PROMPT, Server, make_run

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> dict:
    """One browser session through all three views; returns what it saw."""
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} missing: .ci/run installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} missing (apt-get install chromium)")
    tmp = tmp_path_factory.mktemp("browser")
    run = make_run(tmp / "run")
    shots = tmp / "screenshots"
    shots.mkdir()
    seen: dict = {"run": run, "shots": shots, "dialogs": []}
    server = Server(run)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.set_default_timeout(30_000)
            page.on("dialog", lambda d: (seen["dialogs"].append(d.message), d.dismiss()))
            page.goto(server.url + "/")
            page.wait_for_selector("body[data-ready='1']")

            # --- chat: one turn with the model that answers in HTML, streamed ---------------------
            page.select_option("#chat-stage", "ppo")
            page.fill("#chat-temperature", "0")
            page.fill("#chat-input", XSS_PROMPT)
            page.press("#chat-input", "Enter")
            page.wait_for_selector(".msg.assistant[data-done='1']")
            reply = page.locator(".msg.assistant").last
            seen["chat_pieces"] = int(reply.get_attribute("data-pieces"))
            seen["chat_text"] = reply.evaluate("e => e.firstChild.textContent")
            seen["chat_elements"] = page.locator(".msg script, .msg img, .msg b").count()
            page.screenshot(path=shots / "chat.png", full_page=True)

            # --- compare: SFT vs PPO on a world prompt -------------------------------------------
            page.click("#tab-compare")
            page.select_option("#compare-a", "sft")
            page.select_option("#compare-b", "ppo")
            page.fill("#compare-prompt", "What is 12 + 30?")
            page.click("#compare-run")
            page.wait_for_selector("#compare-out .card >> nth=1")
            seen["compare_cards"] = page.locator("#compare-out .card").evaluate_all(
                "cards => cards.map(c => [c.dataset.stage, c.querySelector('.figures').textContent])")
            seen["compare_answer"] = page.text_content("#compare-answer")
            page.screenshot(path=shots / "compare.png", full_page=True)

            # --- label: rank 3 items by keyboard -------------------------------------------------
            page.click("#tab-label")
            page.fill("#annotator", "ana")
            page.press("#annotator", "Tab")  # commits the name (change event): the first item loads
            page.evaluate("document.activeElement.blur()")  # keys typed into no input rank the responses
            shown = []
            for n in range(3):
                item = page.wait_for_selector("#label-item[data-item-id]:not([hidden])")
                item_id = int(item.get_attribute("data-item-id"))
                texts = page.locator("#label-responses .text").all_text_contents()
                keys = [2, 3, 1][: len(texts)]
                for key in keys:
                    page.keyboard.press(str(key))
                if n == 0:
                    page.screenshot(path=shots / "label.png", full_page=True)
                shown.append((item_id, texts, [k - 1 for k in keys]))
                page.keyboard.press("Enter")
                page.wait_for_selector(f"#label-item:not([data-item-id='{item_id}'])")
            # undo the third label: its item comes back; rank it the other way
            page.keyboard.press("u")
            page.wait_for_selector(f"#label-item[data-item-id='{shown[2][0]}']")
            for key in [1, 2, 3][: len(shown[2][1])]:
                page.keyboard.press(str(key))
            page.keyboard.press("Enter")
            page.wait_for_selector(f"#label-item:not([data-item-id='{shown[2][0]}'])")
            seen["progress"] = page.text_content("#label-progress")
            seen["agreement"] = page.text_content("#label-agreement")
            shown[2] = (shown[2][0], shown[2][1], list(range(len(shown[2][1]))))
            seen["shown"] = shown
            browser.close()
    finally:
        server.stop()
    return seen


def test_browser_chat_compare_and_label(session):
    # chat: streamed in pieces, hostile HTML shown as its literal text, nothing executed or parsed
    assert session["chat_pieces"] > 1
    assert session["chat_text"] == XSS
    assert session["chat_elements"] == 0 and session["dialogs"] == []
    # compare: both stages, with the gold reward (a world prompt) and the RM's score
    stages = [s for s, _ in session["compare_cards"]]
    assert stages == ["sft", "ppo"]
    for _, figures in session["compare_cards"]:
        assert "gold" in figures and "RM" in figures
    assert "42" in session["compare_answer"]
    # label: the rows in SQLite are exactly what was shown and ranked by the keys pressed
    db = sqlite3.connect(session["run"] / "feedback.sqlite")
    rows = db.execute("SELECT item_id, annotator, responses, ranking, status, undone IS NOT NULL FROM labels "
                      "ORDER BY id").fetchall()
    assert len(rows) == 4
    standing = [(i, json.loads(r), json.loads(k)) for i, a, r, k, s, undone in rows if not undone]
    assert standing == session["shown"]
    assert [r[5] for r in rows] == [0, 0, 1, 0]  # the undone label is kept, marked
    assert all(r[1] == "ana" and r[4] == "ranked" for r in rows)
    assert "You: 3 labeled (3 ranked" in session["progress"]
    assert session["agreement"].startswith("Agreement with gold")
    for view in ("chat", "compare", "label"):
        assert (session["shots"] / f"{view}.png").stat().st_size > 5000


def test_browser_labels_train_a_reward_model(session, tmp_path):
    """label -> `gptstack rm --prefs RUN/feedback.sqlite`: the reward model trains on them end to end."""
    from gptstack.data.feedback import read_feedback
    from gptstack.data.split import is_heldout

    run = tmp_path / "run"
    shutil.copytree(session["run"], run, ignore=shutil.ignore_patterns("rm", "*.log"))
    # the rm stage holds out prompts by a hash of their text: take a fraction that puts at least one
    # of the three labeled prompts on each side
    prompts = [row["prompt"] for row in read_feedback(run)[0]]
    fraction = next(f for f in (0.2, 0.35, 0.5, 0.65, 0.8)
                    if 0 < sum(is_heldout(p, f) for p in prompts) < len(prompts))
    sets = ["rm.max_steps=2", "rm.batch_size=2", f"rm.eval_fraction={fraction}", "rm.norm_prompts=4",
            "rm.max_new_tokens=8", "rm.threads=1", "rm.checkpoint_every=0", "rm.warmup_steps=0"]
    args = [sys.executable, "-m", "gptstack.cli", "rm", "--from", str(run / "sft"), "--prefs",
            str(run / "feedback.sqlite"), "--out", str(run)]
    for s in sets:
        args += ["--set", s]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "rm" / "summary.json").read_text())
    assert summary["data/usable"] == 3 and summary["data/skipped/undone"] == 1
    assert 0 <= summary["eval/accuracy"] <= 1
    assert (Path(run) / "rm" / "model.safetensors").exists()
