"""gptstack serve: the label store (hand-built rankings in, the exact rows, pairs and counts out;
a write the disk refuses is rolled back and never acknowledged), the API (auth on every route,
strict Host, body cap, validation, refusals, streaming equal to the engine's output, gold and RM
figures equal to direct computation), and a real uvicorn process: 8 concurrent clients x 200
labels give exactly 1,600 rows, and kill -9 in mid-stream loses no acknowledged label."""
from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import sqlite3
import threading
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from serve_run import SERVE_SETS, XSS, XSS_PROMPT, Server, make_run
from starlette.routing import Mount

from gptstack import world
from gptstack.cli import build_parser, main
from gptstack.common import UserError
from gptstack.config import build_config
from gptstack.data.formats import read_dataset
from gptstack.engine import generate
from gptstack.rundir import load_model, load_scalar_model
from gptstack.data import feedback as store_module
from gptstack.serve.app import LOOPBACK_HOSTS, STATIC, BodyLimit, create_app
from gptstack.serve.config import ServeConfig
from gptstack.data.feedback import (Conflict, FeedbackStore, Invalid, Item, NotFound, export_prefs, gold_agreement,
                                  read_feedback)
from gptstack.tokenizer import ASSISTANT_END, Tokenizer

PROMPT = [{"role": "user", "content": "What is 2 + 3?"}]


# --- the store -----------------------------------------------------------------------------------


def _items(store, annotator, n=4, k=3, gold=None, finished=None):
    items = [Item(PROMPT, [f"r{i}-{j}" for j in range(k)], finished or [True] * k, gold, i) for i in range(n)]
    return store.add_items(annotator, items, model="sft", source="world")


def test_store_labels_undo_and_read_feedback(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.sqlite")
    a, b, c, d = _items(store, "ana")
    assert store.next_item("ana").id == a.id and store.next_item("bob") is None
    store.label(a.id, "ana", "ranked", [2, 0, 1])
    store.label(b.id, "ana", "all_bad")
    store.label(c.id, "ana", "skipped")
    store.label(d.id, "ana", "ranked", [1, 2, 0])
    assert store.next_item("ana") is None
    # undo marks the last label undone (kept, not deleted) and its item comes back
    assert store.undo("ana") == {"label_id": 4, "item_id": d.id, "status": "ranked"}
    assert store.next_item("ana").id == d.id
    store.label(d.id, "ana", "ranked", [0, 2, 1])
    rows, counts = read_feedback(tmp_path / "feedback.sqlite")
    ended = [True] * 3
    assert rows == [{"prompt": PROMPT, "responses": ["r0-0", "r0-1", "r0-2"], "ranking": [2, 0, 1], "ended": ended},
                    {"prompt": PROMPT, "responses": ["r3-0", "r3-1", "r3-2"], "ranking": [0, 2, 1], "ended": ended}]
    assert counts == {"data/rows": 5, "data/usable": 2, "data/skipped": 3, "data/skipped/all_bad": 1,
                      "data/skipped/skipped": 1, "data/skipped/undone": 1}
    assert read_feedback(tmp_path) == (rows, counts)  # the run directory works too
    db = sqlite3.connect(tmp_path / "feedback.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT COUNT(*) FROM labels").fetchone()[0] == 5
    assert db.execute("SELECT annotator, model, status, json(ranking) FROM labels WHERE id = 1").fetchone() == \
        ("ana", "sft", "ranked", "[2,0,1]")


def test_store_refuses_labels_that_do_not_fit(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.sqlite")
    a, b = _items(store, "ana", n=2)
    for bad in ([0, 1], [0, 1, 1], [0, 1, 3], [2, 1, 0, 3], [True, 0, 2], None, "012"):
        with pytest.raises(Invalid, match="does not match the 3 responses"):
            store.label(a.id, "ana", "ranked", bad)
    with pytest.raises(Invalid, match="responses sent do not match"):
        store.label(a.id, "ana", "ranked", [0, 1, 2], responses=["r0-0", "r0-1", "something else"])
    with pytest.raises(Invalid, match="takes no ranking"):
        store.label(a.id, "ana", "skipped", [0, 1, 2])
    with pytest.raises(NotFound):
        store.label(999, "ana", "ranked", [0, 1, 2])
    with pytest.raises(Conflict, match="shown to 'ana'"):
        store.label(a.id, "bob", "ranked", [0, 1, 2])
    store.label(a.id, "ana", "ranked", [0, 1, 2], responses=["r0-0", "r0-1", "r0-2"])
    with pytest.raises(Conflict, match="already labeled"):
        store.label(a.id, "ana", "ranked", [2, 1, 0])
    assert read_feedback(tmp_path)[1]["data/usable"] == 1 and read_feedback(tmp_path)[1]["data/skipped"] == 0


def test_gold_agreement_counts_pairs_whose_gold_differs():
    # ranking 1 > 0 > 2 with gold (1.0, 0.2, 0.2): (1, 0) disagrees, (1, 2) is a gold tie (left
    # out), (0, 2) agrees
    assert gold_agreement([([1, 0, 2], [1.0, 0.2, 0.2])]) == (1, 2)
    assert gold_agreement([([0, 1, 2], [0.9, 0.5, 0.1]), ([2, 1, 0], [0.9, 0.5, 0.1])]) == (3, 6)


def test_stats_report_progress_and_agreement_with_gold(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.sqlite")
    a, b, c = _items(store, "ana", n=3, gold=[1.0, 0.2, 0.2])
    store.label(a.id, "ana", "ranked", [1, 0, 2])   # 1 of 2 gold pairs agree
    store.label(b.id, "ana", "ranked", [0, 2, 1])   # 2 of 2
    store.label(c.id, "ana", "all_bad")
    s = store.stats("ana")
    assert (s["gold_agree"], s["gold_pairs"], s["gold_agreement"]) == (3, 4, 0.75)
    assert s["labeled"] == 3 and s["by_status"] == {"ranked": 2, "all_bad": 1, "skipped": 0} and s["pending"] == 0
    store.undo("ana")
    store.undo("ana")
    s = store.stats("ana")
    assert (s["gold_agree"], s["gold_pairs"], s["labeled"], s["pending"]) == (1, 2, 1, 2)


def test_export_prefs_writes_every_pair_and_kwise_rows_that_read_back(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.sqlite")
    a, b, c = _items(store, "ana", n=3, gold=[0.9, 0.1, 0.5], finished=[True, False, True])
    store.label(a.id, "ana", "ranked", [2, 0, 1])
    store.label(b.id, "ana", "skipped")
    store.label(c.id, "ana", "ranked", [1, 0, 2])
    out = tmp_path / "prefs.jsonl"
    assert export_prefs(tmp_path, out) == 6
    pairs = [(r["chosen"], r["rejected"]) for r in read_dataset(out, expect="preference").rows]
    assert pairs == [("r0-2", "r0-0"), ("r0-2", "r0-1"), ("r0-0", "r0-1"),
                     ("r2-1", "r2-0"), ("r2-1", "r2-2"), ("r2-0", "r2-2")]
    assert all(r["prompt"] == PROMPT for r in read_dataset(out).rows)
    kwise = tmp_path / "kwise.jsonl"
    assert export_prefs(tmp_path, kwise, kwise=True) == 2
    ds = read_dataset(kwise, expect="ranking")
    assert ds.rows == read_feedback(tmp_path)[0]
    assert ds.rows[0]["ended"] == [True, False, True] and ds.rows[0]["gold"] == [0.9, 0.1, 0.5]


def test_an_older_store_is_upgraded_and_a_newer_one_refused(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.sqlite")
    (a,) = _items(store, "ana", n=1, finished=[True, False, True])
    store.label(a.id, "ana", "ranked", [1, 0, 2])
    db = sqlite3.connect(tmp_path / "feedback.sqlite")
    db.execute("ALTER TABLE labels DROP COLUMN finished")  # the version 1 layout
    db.execute("PRAGMA user_version = 1")
    db.commit()
    (row,), _ = read_feedback(tmp_path)
    assert row["ended"] == [True, False, True]
    db.execute("PRAGMA user_version = 99")
    db.commit()
    with pytest.raises(UserError, match="schema version 99 comes from a newer gptstack"):
        FeedbackStore(tmp_path / "feedback.sqlite")


def test_a_store_that_cannot_be_opened_for_writing_stops_with_one_line(tmp_path, monkeypatch):
    def refuse(path):
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(store_module, "_connect", refuse)
    with pytest.raises(UserError, match="cannot write .*feedback.sqlite .*unable to open database file"):
        FeedbackStore(tmp_path / "feedback.sqlite")


def test_read_feedback_names_a_missing_or_foreign_file(tmp_path):
    with pytest.raises(UserError, match="no feedback database"):
        read_feedback(tmp_path / "nope.sqlite")
    (tmp_path / "junk.sqlite").write_text("not a database at all, just text" * 10)
    with pytest.raises(UserError, match="junk.sqlite: not a SQLite database"):
        read_feedback(tmp_path / "junk.sqlite")
    sqlite3.connect(tmp_path / "other.sqlite").execute("CREATE TABLE t (x)")
    with pytest.raises(UserError, match="expected the items and labels"):
        read_feedback(tmp_path / "other.sqlite")


# --- the API ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return make_run(tmp_path_factory.mktemp("serve") / "run")


@pytest.fixture(scope="module")
def cfg():
    return build_config("tiny", None, SERVE_SETS)


@pytest.fixture(scope="module")
def client(run_dir, cfg) -> TestClient:
    app = create_app(run_dir, cfg, allowed_hosts=("127.0.0.1",))
    return TestClient(app, base_url="http://127.0.0.1")


def _events(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_token_guards_every_api_route_but_health(run_dir, cfg):
    c = TestClient(create_app(run_dir, cfg, token="s3cret"), base_url="http://127.0.0.1")
    assert c.get("/api/health").status_code == 200
    assert c.get("/").status_code == 200  # the page holds no data; it asks for the token
    calls = [("GET", "/api/info", None), ("POST", "/api/label/next", {"annotator": "x"}),
             ("GET", "/api/label/stats?annotator=x", None), ("GET", "/api/world/prompt", None),
             ("POST", "/api/label", {"item_id": 1, "annotator": "x", "ranking": [0, 1]}),
             ("POST", "/api/label/undo", {"annotator": "x"}),
             ("POST", "/api/chat", {"stage": "sft", "messages": [{"role": "user", "content": "hi"}]}),
             ("POST", "/api/compare", {"prompt": "hi", "stages": ["sft"]}), ("GET", "/api/nonexistent", None)]
    for method, path, body in calls:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = c.request(method, path, json=body, headers=headers)
            assert r.status_code == 401, (method, path, headers)
            assert "token" in r.json()["detail"]
    ok = {"Authorization": "Bearer s3cret"}
    assert c.get("/api/info", headers=ok).status_code == 200
    assert c.get("/api/label/stats?annotator=x", headers=ok).status_code == 200


def test_every_route_needs_the_token_but_the_page_and_health(run_dir, cfg):
    app = create_app(run_dir, cfg, token="s3cret")
    c = TestClient(app, base_url="http://127.0.0.1")
    public = {"/", "/static", "/api/health"}  # the page asks for the token; it holds no data
    assert public <= {route.path for route in app.routes}
    for route in app.routes:
        path = route.path + "/app.js" if isinstance(route, Mount) else route.path
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            r = c.request(method, path)
            if route.path in public:
                assert r.status_code == 200, (method, path)
            else:
                assert r.status_code == 401 and "token" in r.json()["detail"], (method, path)
    # the schema and docs FastAPI serves by default: off, and behind the token like any path
    for path in ("/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect", "/static", "/nonexistent"):
        assert c.get(path).status_code == 401, path
        assert c.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 404, path


def test_host_header_must_be_exactly_a_served_name(run_dir, cfg):
    c = TestClient(create_app(run_dir, cfg, allowed_hosts=LOOPBACK_HOSTS), base_url="http://127.0.0.1")
    for host in ("localhost", "localhost:8000", "LocalHost:8080", "127.0.0.1", "127.0.0.1:8000", "[::1]",
                 "[::1]:8000"):
        assert c.get("/api/health", headers={"Host": host}).status_code == 200, host
    for host in ("localhost.evil.com", "localhost.evil.com:8000", "127.0.0.1.nip.io", "evil.example:8000",
                 "localhost:abc", "localhost:", "localhost:0", "localhost:99999", "localhost:8000:1",
                 "evil.com#localhost", "a@localhost", "localhost@evil.com", "localhost/x", "[::1]x", "[::1",
                 "::1", ""):
        r = c.get("/api/health", headers={"Host": host})
        assert r.status_code in (400, 421) and "host" in r.json()["detail"].lower(), host
    # two Host headers: which one a proxy would route by is anyone's guess
    r = c.get("/api/health", headers=[("Host", "evil.example"), ("Host", "localhost")])
    assert r.status_code == 400


def test_bodies_over_the_cap_get_413_before_they_are_parsed(run_dir, monkeypatch):
    assert ServeConfig().max_body_bytes == 256 * 1024
    cfg = build_config("tiny", None, [*SERVE_SETS, "serve.max_body_bytes=1000"])
    c = TestClient(create_app(run_dir, cfg), base_url="http://127.0.0.1")
    monkeypatch.setattr("gptstack.engine.chat.fit_history", lambda *a: pytest.fail("a refused body reached the endpoint"))
    chat = json.dumps({"stage": "sft", "messages": [{"role": "user", "content": "7 " * 1000}]}).encode()
    for body in (chat, iter([chat[:600], chat[600:]]), b"{" * 2000):  # with Content-Length, chunked, not JSON
        r = c.post("/api/chat", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["detail"].startswith("request body over the limit of 1000 bytes")
        assert "serve.max_body_bytes" in r.json()["detail"]
    small = json.dumps({"annotator": "x"}).encode()
    for body in (small, iter([small[:5], small[5:]])):
        r = c.post("/api/label/undo", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 200 and r.json()["undone"] is None
    with pytest.raises(UserError, match="serve.max_body_bytes: expected at least 1"):
        create_app(run_dir, build_config("tiny", None, [*SERVE_SETS, "serve.max_body_bytes=0"]))


def test_body_cap_counts_the_chunks_of_a_body_without_a_length():
    async def echo(scope, receive, send):
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message["body"], message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    def post(chunks: list[bytes]) -> tuple[int, bytes]:
        incoming = [{"type": "http.request", "body": b, "more_body": i < len(chunks) - 1} for i, b in enumerate(chunks)]
        sent = []

        async def receive():
            return incoming.pop(0)

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"transfer-encoding", b"chunked")]}
        asyncio.run(BodyLimit(echo, limit=10)(scope, receive, send))
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

    assert post([b"abc", b"defg", b"hij"]) == (200, b"abcdefghij")  # at the limit: handed on whole
    status, body = post([b"abc", b"defg", b"hijk", b"never read"])
    assert status == 413 and b"limit of 10 bytes" in body


def test_defaults_are_safe(client):
    assert build_parser().parse_args(["serve", "RUN"]).host == "127.0.0.1"
    # a DNS-rebinding page reaches a loopback server under its own host name: refused
    assert client.get("/api/health", headers={"Host": "evil.example:8000"}).status_code == 421
    r = client.get("/")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    # a cross-site form can post text/plain, never JSON: such a body is refused
    r = client.post("/api/label/undo", content='{"annotator": "x"}', headers={"Content-Type": "text/plain"})
    assert r.status_code == 422


def test_page_never_writes_html_from_strings():
    js = (STATIC / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in js, sink
    assert "<script>" not in (STATIC / "index.html").read_text()  # no inline script (the CSP forbids it)


@pytest.mark.parametrize("path,body,field", [
    ("/api/label", {"annotator": "x", "ranking": [0, 1]}, ["body", "item_id"]),
    ("/api/label", {"item_id": 1, "annotator": "", "ranking": [0, 1]}, ["body", "annotator"]),
    ("/api/label", {"item_id": 1, "annotator": "x", "ranking": "01"}, ["body", "ranking"]),
    ("/api/label", {"item_id": 1, "annotator": "x", "ranking": [True, "0", 2.0]}, ["body", "ranking", 0]),
    ("/api/label", {"item_id": "1", "annotator": "x", "ranking": [0, 1]}, ["body", "item_id"]),
    ("/api/label", {"item_id": 1, "annotator": "x", "status": "meh"}, ["body", "status"]),
    ("/api/label", {"item_id": 1, "annotator": "x", "rank": [0, 1]}, ["body", "rank"]),
    ("/api/chat", {"stage": "sft", "messages": [{"role": "user", "content": "hi"}], "temperature": -1},
     ["body", "temperature"]),
    ("/api/chat", {"stage": "sft", "messages": [{"role": "assistant", "content": "hi"}]}, ["body", "messages"]),
    ("/api/chat", {"stage": "../sft", "messages": [{"role": "user", "content": "hi"}]}, ["body", "stage"]),
    ("/api/compare", {"prompt": "hi", "stages": []}, ["body", "stages"]),
])
def test_bad_bodies_get_422_naming_the_field(client, path, body, field):
    r = client.post(path, json=body)
    assert r.status_code == 422
    assert field in [e["loc"] for e in r.json()["detail"]]
    assert ".".join(map(str, field)) in r.json()["error"]


def test_label_api_refuses_rankings_that_do_not_match_what_was_shown(client, run_dir):
    item = client.post("/api/label/next", json={"annotator": "refuse"}).json()
    k = len(item["responses"])
    for bad in ([0] * k, list(range(k + 1)), list(range(k - 1)), [k] + list(range(1, k))):
        r = client.post("/api/label", json={"item_id": item["item_id"], "annotator": "refuse", "ranking": bad})
        assert r.status_code == 422 and "does not match" in r.json()["detail"], bad
    r = client.post("/api/label", json={"item_id": item["item_id"], "annotator": "refuse",
                                        "ranking": list(range(k)), "responses": item["responses"][::-1]})
    assert r.status_code == 422
    assert client.post("/api/label", json={"item_id": 10**6, "annotator": "refuse",
                                           "ranking": [0, 1]}).status_code == 404
    assert client.post("/api/label", json={"item_id": item["item_id"], "annotator": "someone else",
                                           "ranking": list(range(k))}).status_code == 409
    db = sqlite3.connect(run_dir / "feedback.sqlite")
    assert db.execute("SELECT COUNT(*) FROM labels WHERE item_id = ?", (item["item_id"],)).fetchone()[0] == 0
    good = {"item_id": item["item_id"], "annotator": "refuse", "ranking": list(range(k))[::-1],
            "responses": item["responses"]}
    assert client.post("/api/label", json=good).status_code == 200
    assert client.post("/api/label", json=good).status_code == 409  # a double submit counts once


class _FailingWrites:
    """A store connection whose INSERTs fail with `error` (SQLite itself writes from C, out of a
    monkeypatch's reach: this stands in for the write that would fail)."""

    def __init__(self, db, error: OSError):
        self.db, self.error = db, error

    def execute(self, sql, *args):
        if sql.startswith("INSERT"):
            raise self.error
        return self.db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.db, name)


@pytest.mark.parametrize("refusal,status", [
    ("PRAGMA max_page_count = {pages}", 507),  # the file may not grow: SQLITE_FULL, what ENOSPC gives SQLite
    ("PRAGMA query_only = ON", 503),           # SQLITE_READONLY, as from a read-only file
    (OSError(errno.ENOSPC, "No space left on device"), 507),
    (OSError(errno.EROFS, "Read-only file system"), 503),
    (OSError(errno.EACCES, "Permission denied"), 503),
])
def test_a_label_the_disk_refuses_is_not_acknowledged(run_dir, cfg, tmp_path, monkeypatch, refusal, status):
    run = shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("feedback.sqlite*", "*.log"))
    app = create_app(run, cfg)
    c = TestClient(app, base_url="http://127.0.0.1")
    store = app.state.run.store
    # long responses: a label copies its item, so storing one needs new pages
    a, b = store.add_items("ana", [Item(PROMPT, [f"{j} " + "x" * 20_000 for j in range(3)], [True] * 3, None, i)
                                   for i in range(2)], model="sft", source="world")
    assert c.post("/api/label", json={"item_id": a.id, "annotator": "ana", "ranking": [0, 1, 2]}).status_code == 200
    healthy = store._db

    def refusing():
        db = healthy()
        if isinstance(refusal, OSError):
            return _FailingWrites(db, refusal)
        db.execute(refusal.format(pages=db.execute("PRAGMA page_count").fetchone()[0]))
        return db

    monkeypatch.setattr(store, "_db", refusing)
    r = c.post("/api/label", json={"item_id": b.id, "annotator": "ana", "ranking": [2, 1, 0]})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert "nothing of this request was stored" in detail and "feedback.sqlite" in detail
    assert ("is full" in detail) if status == 507 else ("cannot write" in detail)
    # not acknowledged and not stored: the earlier label stands, the item still waits, the file is whole
    assert c.get("/api/label/stats", params={"annotator": "ana"}).json()["labeled"] == 1
    assert c.post("/api/label/next", json={"annotator": "ana"}).json()["item_id"] == b.id
    db = sqlite3.connect(run / "feedback.sqlite")
    assert db.execute("SELECT item_id FROM labels").fetchall() == [(a.id,)]
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    def freed():  # space freed, file writable again: the same label goes through
        db = healthy()
        db.execute("PRAGMA max_page_count = 1073741823")
        db.execute("PRAGMA query_only = OFF")
        return db

    monkeypatch.setattr(store, "_db", freed)
    r = c.post("/api/label", json={"item_id": b.id, "annotator": "ana", "ranking": [2, 1, 0]})
    assert r.status_code == 200 and r.json()["stats"]["labeled"] == 2


def test_label_items_are_distinct_samples_with_their_gold(client, run_dir, cfg):
    first = client.post("/api/label/next", json={"annotator": "gold"}).json()
    assert client.post("/api/label/next", json={"annotator": "gold"}).json()["item_id"] == first["item_id"]
    db = sqlite3.connect(run_dir / "feedback.sqlite")
    for item_id, prompt, responses, finished, gold in db.execute(
            "SELECT id, prompt, responses, finished, gold FROM items WHERE annotator = 'gold'"):
        prompt, responses, finished, gold = map(json.loads, (prompt, responses, finished, gold))
        assert 2 <= len(responses) <= cfg.serve.k and len(set(responses)) == len(responses) and all(responses)
        task = world.task_from_prompt(prompt[-1]["content"])
        assert gold == [world.gold(task, r, f) for r, f in zip(responses, finished)]
    # the prompts are world training prompts, never held-out eval items
    index = world.eval_index(cfg.world)
    assert not any(index.contains(json.loads(p)[-1]["content"]) for (p,) in db.execute("SELECT prompt FROM items"))
    # labeling moves on; undo brings the item back
    k = len(first["responses"])
    r = client.post("/api/label", json={"item_id": first["item_id"], "annotator": "gold", "ranking": list(range(k))})
    assert r.json()["stats"]["labeled"] == 1
    second = client.post("/api/label/next", json={"annotator": "gold"}).json()
    assert second["item_id"] != first["item_id"]
    undone = client.post("/api/label/undo", json={"annotator": "gold"}).json()
    assert undone["undone"]["item_id"] == first["item_id"] and undone["stats"]["labeled"] == 0
    assert client.post("/api/label/next", json={"annotator": "gold"}).json()["item_id"] == first["item_id"]
    assert client.post("/api/label/undo", json={"annotator": "nobody"}).json()["undone"] is None


def test_label_prompts_from_a_file(run_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Write a haiku.", "What is 2 + 3?")))
    cfg = build_config("tiny", None, [*SERVE_SETS, f"serve.prompts={prompts}", "serve.batch=2"])
    run = shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("feedback.sqlite*", "*.log"))
    c = TestClient(create_app(run, cfg), base_url="http://127.0.0.1")
    first = c.post("/api/label/next", json={"annotator": "ana"}).json()
    assert first["prompt"] == [{"role": "user", "content": "Write a haiku."}] and first["source"] == str(prompts)
    assert first["world"] is False  # no gold for a prompt outside the world
    c.post("/api/label", json={"item_id": first["item_id"], "annotator": "ana", "status": "skipped"})
    second = c.post("/api/label/next", json={"annotator": "ana"}).json()
    assert second["prompt"][-1]["content"] == "What is 2 + 3?" and second["world"] is True


def test_bad_serve_settings_stop_before_serving(run_dir, tmp_path):
    for sets, message in ((["serve.k=1"], "serve.k: expected at least 2"),
                          (["serve.top_p=0"], "0 < serve.top_p <= 1"),
                          ([f"serve.prompts={tmp_path / 'none.jsonl'}"], "none.jsonl: file not found")):
        with pytest.raises(UserError, match=message):
            create_app(run_dir, build_config("tiny", None, [*SERVE_SETS, *sets]))


def test_chat_streams_exactly_what_the_engine_samples(client, run_dir):
    model, _ = load_model(run_dir / "sft")
    tok = Tokenizer.load(run_dir / "tokenizer")
    messages = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"},
                {"role": "user", "content": "And 4 + 4?"}]
    r = client.post("/api/chat", json={"stage": "sft", "messages": messages, "temperature": 1.0, "top_k": 50,
                                       "max_new_tokens": 40, "seed": 7})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _events(r.text)
    pieces = [d["text"] for e, d in events if e == "token"]
    (kind, done), = [(e, d) for e, d in events if e != "token"]
    end = tok.special(ASSISTANT_END)
    (c,), = generate(model, [tok.render_prompt(messages)], 40, temperature=1.0, top_k=50, stop_ids=[end], seed=7)
    expected = tok.decode([t for t in c.tokens if t != end])
    assert kind == "done" and len(pieces) > 1
    assert "".join(pieces) == done["text"] == expected and done["finished"] == c.finished


def test_chat_renders_hostile_model_output_as_data(client):
    r = client.post("/api/chat", json={"stage": "ppo", "messages": [{"role": "user", "content": XSS_PROMPT}],
                                       "temperature": 0, "max_new_tokens": 96})
    events = _events(r.text)
    assert events[-1] == ("done", {"text": XSS, "finished": True, "stage": "ppo",
                                   "seconds": events[-1][1]["seconds"], "dropped_messages": 0})
    assert "".join(d["text"] for e, d in events if e == "token") == XSS


def test_terminal_chat_shares_the_streaming_path(run_dir):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "gptstack.cli", "chat", str(run_dir / "ppo"), "--temperature", "0",
                           "--max-new-tokens", "96"], input=f"{XSS_PROMPT}\n/reset\n{XSS_PROMPT}\n",
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"assistant> {XSS}\n" * 2


def test_chat_errors_are_http_errors_before_the_stream(client):
    assert client.post("/api/chat", json={"stage": "nope", "messages": [{"role": "user", "content": "hi"}]}
                       ).status_code == 404
    r = client.post("/api/chat", json={"stage": "rm", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 422 and "scalar head" in r.json()["detail"]
    r = client.post("/api/chat", json={"stage": "sft", "messages": [{"role": "user", "content": "7 " * 400}]})
    assert r.status_code == 422 and "too long" in r.json()["detail"]


def test_a_long_chat_keeps_its_system_message_or_says_what_is_too_long(client, run_dir):
    model, _ = load_model(run_dir / "sft")
    tok = Tokenizer.load(run_dir / "tokenizer")
    system = {"role": "system", "content": "Answer with one number."}
    pairs = [[{"role": "user", "content": f"What is {i} + {i}?"}, {"role": "assistant", "content": f"{2 * i} " * 12}]
             for i in range(6)]
    messages = [system, *(m for pair in pairs for m in pair), {"role": "user", "content": "And 3 + 4?"}]
    assert len(tok.render_prompt(messages)) + 8 > model.config.block_size  # too long as a whole
    r = client.post("/api/chat", json={"stage": "sft", "messages": messages, "max_new_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    kind, done = _events(r.text)[-1]
    dropped = done["dropped_messages"]
    assert kind == "done" and dropped > 0 and dropped % 2 == 0
    # the oldest pairs went, the system message stayed, and no more was dropped than needed
    history = [system, *messages[1 + dropped:]]
    assert len(tok.render_prompt(history)) + 8 <= model.config.block_size
    assert len(tok.render_prompt([system, *messages[1 + dropped - 2:]])) + 8 > model.config.block_size
    end = tok.special(ASSISTANT_END)
    (c,), = generate(model, [tok.render_prompt(history)], 8, temperature=0, stop_ids=[end])
    assert done["text"] == tok.decode([t for t in c.tokens if t != end])
    # the system message and the last message alone do not fit: 422 saying which, how long, what to do
    r = client.post("/api/chat", json={"stage": "sft", "messages": [system, *pairs[0],
                                                                     {"role": "user", "content": "7 " * 400}]})
    detail = r.json()["detail"]
    assert r.status_code == 422 and "too long for stage 'sft'" in detail
    assert "the system message and the last user message take" in detail and "context is 128 tokens" in detail
    assert "shorten them" in detail


def test_compare_reports_gold_and_rm_score_as_computed_directly(client, run_dir):
    prompt = "What is 2 + 3?"
    data = client.post("/api/compare", json={"prompt": prompt, "stages": ["sft", "ppo"], "max_new_tokens": 30,
                                             "temperature": 0}).json()
    assert data["world"] and data["answer"] == "5"
    tok = Tokenizer.load(run_dir / "tokenizer")
    rm, _ = load_scalar_model(run_dir / "rm", "reward")
    task = world.task_from_prompt(prompt)
    for res, stage in zip(data["results"], ["sft", "ppo"]):
        model, _ = load_model(run_dir / stage)
        end = tok.special(ASSISTANT_END)
        (c,), = generate(model, [tok.render_prompt(PROMPT)], 30, temperature=0, stop_ids=[end])
        text = tok.decode([t for t in c.tokens if t != end])
        assert (res["stage"], res["text"], res["finished"]) == (stage, text, c.finished)
        assert res["gold"] == world.gold(task, text, c.finished)
        ids, _ = tok.render_conversation([*PROMPT, {"role": "assistant", "content": text}])
        ids = ids if c.finished else ids[:-1]
        with torch.inference_mode():
            assert res["rm"] == pytest.approx(rm.score(torch.tensor([ids]))[0].item(), abs=1e-5)
    other = client.post("/api/compare", json={"prompt": "Tell me a story.", "stages": ["sft"], "max_new_tokens": 5})
    assert other.json()["world"] is False and other.json()["results"][0]["gold"] is None


def test_serve_command_takes_the_token_from_the_environment(run_dir, monkeypatch):
    import gptstack.serve.app as app_module

    seen = {}
    monkeypatch.setattr(app_module, "serve", lambda run, cfg, host, port, token: seen.update(host=host, token=token))
    monkeypatch.setenv("GPTSTACK_SERVE_TOKEN", "from-env")
    assert main(["serve", str(run_dir)]) == 0 and seen == {"host": "127.0.0.1", "token": "from-env"}
    assert main(["serve", str(run_dir), "--token", "flag"]) == 0 and seen["token"] == "flag"


def test_serve_command_refuses_a_run_without_models(tmp_path, capsys):
    assert main(["serve", str(tmp_path)]) == 2
    assert "no tokenizer" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err


# --- a real server -------------------------------------------------------------------------------


def test_a_real_server_refuses_big_bodies_and_bad_hosts(run_dir, tmp_path):
    run = shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("feedback.sqlite*", "*.log"))
    server = Server(run, sets=[*SERVE_SETS, "serve.max_body_bytes=4096"])
    big = json.dumps({"stage": "sft", "messages": [{"role": "user", "content": "7 " * 100_000}]}).encode()
    json_type = {"Content-Type": "application/json"}
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            r = http.post("/api/chat", content=big, headers=json_type)
            assert r.status_code == 413 and "4096 bytes" in r.json()["detail"]
            chunks = (big[i:i + 1000] for i in range(0, len(big), 1000))  # chunked: no Content-Length
            r = http.post("/api/chat", content=chunks, headers=json_type)
            assert r.status_code == 413 and "4096 bytes" in r.json()["detail"]
            r = http.post("/api/label/undo", content=iter([b'{"annotator":', b' "x"}']), headers=json_type)
            assert r.status_code == 200 and r.json()["undone"] is None
            assert http.get("/api/health", headers={"Host": f"localhost:{server.port}"}).status_code == 200
            for host in (f"localhost:{server.port}x", f"localhost.evil.com:{server.port}", "a@localhost"):
                assert http.get("/api/health", headers={"Host": host}).status_code in (400, 421), host
    finally:
        server.stop()


def test_concurrent_clients_lose_and_duplicate_no_label(run_dir, tmp_path):
    run = shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("feedback.sqlite*", "*.log"))
    server = Server(run, sets=[*SERVE_SETS, "serve.batch=50"])
    clients, per_client = 8, 200
    acknowledged: dict[str, list[int]] = {}
    errors: list[str] = []

    def annotate(name: str) -> None:
        ids = []
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for _ in range(per_client):
                item = http.post("/api/label/next", json={"annotator": name}).json()
                k = len(item["responses"])
                r = http.post("/api/label", json={"item_id": item["item_id"], "annotator": name,
                                                  "ranking": list(range(k))[::-1], "responses": item["responses"]})
                if r.status_code != 200:
                    errors.append(r.text)
                    return
                ids.append(r.json()["label_id"])
        acknowledged[name] = ids

    try:
        threads = [threading.Thread(target=annotate, args=(f"client{i}",)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.stop()
    assert not errors, errors[:3]
    db = sqlite3.connect(run / "feedback.sqlite")
    assert db.execute("SELECT COUNT(*) FROM labels").fetchone()[0] == clients * per_client == 1600
    assert db.execute("SELECT COUNT(DISTINCT item_id) FROM labels").fetchone()[0] == 1600
    assert dict(db.execute("SELECT annotator, COUNT(*) FROM labels GROUP BY annotator")) == \
        {f"client{i}": per_client for i in range(clients)}
    ids = sorted(i for v in acknowledged.values() for i in v)
    assert ids == [r[0] for r in db.execute("SELECT id FROM labels ORDER BY id")]
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert read_feedback(run)[1]["data/usable"] == 1600


def test_kill_9_mid_stream_loses_no_acknowledged_label(run_dir, tmp_path):
    from gptstack.config import Config
    from gptstack.model.gpt import GPT, GPTConfig
    from gptstack.rundir import save_model

    run = shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("feedback.sqlite*", "*.log"))
    # a model with a long context, so a stream is certainly still going when the server dies
    tok = Tokenizer.load(run / "tokenizer")
    big = Config(model=GPTConfig(vocab_size=tok.vocab_size, n_layer=4, n_head=4, n_embd=128, block_size=2048))
    torch.manual_seed(3)
    save_model(run / "big", GPT(big.model).state_dict(), big.to_dict())
    server = Server(run)
    acknowledged: list[int] = []
    labeling = threading.Event()

    def annotate() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            try:
                while True:
                    item = http.post("/api/label/next", json={"annotator": "ana"}).json()
                    r = http.post("/api/label", json={"item_id": item["item_id"], "annotator": "ana",
                                                      "ranking": list(range(len(item["responses"])))})
                    assert r.status_code == 200
                    acknowledged.append(r.json()["label_id"])
                    labeling.set()
            except httpx.TransportError:
                return  # the server is gone

    labeler = threading.Thread(target=annotate)
    labeler.start()
    assert labeling.wait(30)
    events = []
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            body = {"stage": "big", "messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 2000}
            with http.stream("POST", "/api/chat", json=body) as stream:
                lines = stream.iter_lines()
                for line in lines:
                    if line.startswith("event: "):
                        events.append(line[7:])
                    if len(events) >= 5:
                        break
                server.kill()
                with pytest.raises(httpx.TransportError):
                    for line in lines:
                        if line.startswith("event: "):
                            events.append(line[7:])
    finally:
        server.kill()
        labeler.join()
        server.stop()
    assert events and "done" not in events  # killed mid-stream
    assert len(acknowledged) >= 1
    db = sqlite3.connect(run / "feedback.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = [r[0] for r in db.execute("SELECT id FROM labels ORDER BY id")]
    # every acknowledged label is there; at most the one in flight at the kill may also be
    assert set(acknowledged) <= set(stored) and len(stored) - len(acknowledged) in (0, 1)
    # and a restarted server carries on from the same store
    again = Server(run)
    try:
        stats = httpx.get(again.url + "/api/label/stats", params={"annotator": "ana"}).json()
        assert stats["labeled"] == len(stored)
    finally:
        again.stop()
