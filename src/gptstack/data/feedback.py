"""RUN/feedback.sqlite: the labels people give in `gptstack serve`, and the readers stages use.

    store = FeedbackStore("runs/demo/feedback.sqlite")
    [item] = store.add_items("ana", [Item(prompt, responses, finished, gold, prompt_index=0)],
                             model="sft", source="world")
    store.label(item.id, "ana", "ranked", [2, 0, 1])   # committed (and fsynced) before it returns
    store.undo("ana")                                  # the last label is marked undone, its item comes back
    rows, counts = read_feedback("runs/demo/feedback.sqlite")    # what `gptstack rm --prefs` trains on
    export_prefs("runs/demo", "prefs.jsonl")                     # TRL prompt/chosen/rejected JSONL

Two tables. `items` holds what was shown: a prompt and the K responses the model sampled for it,
assigned to one annotator. `labels` holds one row per judgement, self-contained (annotator,
prompt, responses, model, ranking best first, status ranked / all_bad / skipped, time); undo sets
its `undone` time rather than deleting it, so nothing anyone did is ever lost. A partial unique
index allows one active label per item, so a double submit can never count twice.

Durability: WAL journal with synchronous=FULL, one `BEGIN IMMEDIATE` transaction per label: a
label the server acknowledged is on disk, and a killed server (even kill -9 mid-write) leaves the
database with every committed label and nothing half-written (SQLite rolls back the rest). A write
the disk refuses (full, read-only, I/O error) is rolled back the same way and raised as DiskFull or
Unwritable, so the server answers 507 / 503 instead of acknowledging it.
"""
from __future__ import annotations

import errno
import json
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..common import UserError, atomic_write_text

FILENAME = "feedback.sqlite"
STATUSES = ("ranked", "all_bad", "skipped")
SCHEMA_VERSION = 2  # 2: labels.finished (version 1 files are upgraded in place)

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id           INTEGER PRIMARY KEY,
    annotator    TEXT NOT NULL,        -- who it was shown to
    prompt_index INTEGER NOT NULL,     -- position in the server's prompt set
    prompt       TEXT NOT NULL,        -- JSON: messages ending with the user's turn
    responses    TEXT NOT NULL,        -- JSON: list of response texts, in the order shown
    finished     TEXT NOT NULL,        -- JSON: per response, did the model end its turn
    gold         TEXT,                 -- JSON: per response gold reward (world prompts), else NULL
    model        TEXT NOT NULL,        -- the stage that sampled the responses, e.g. sft
    source       TEXT NOT NULL,        -- the prompt set: world or a file path
    created      REAL NOT NULL         -- unix time
);
CREATE INDEX IF NOT EXISTS items_by_annotator ON items (annotator, id);
CREATE TABLE IF NOT EXISTS labels (
    id         INTEGER PRIMARY KEY,
    item_id    INTEGER NOT NULL REFERENCES items (id),
    annotator  TEXT NOT NULL,
    prompt     TEXT NOT NULL,          -- JSON, copied from the item: a label row stands alone
    responses  TEXT NOT NULL,          -- JSON
    finished   TEXT NOT NULL,          -- JSON
    gold       TEXT,                   -- JSON or NULL
    model      TEXT NOT NULL,
    status     TEXT NOT NULL CHECK (status IN ('ranked', 'all_bad', 'skipped')),
    ranking    TEXT,                   -- JSON: response indices, best first (status ranked), else NULL
    created    REAL NOT NULL,
    undone     REAL                    -- time of the undo, NULL while the label stands
);
CREATE UNIQUE INDEX IF NOT EXISTS one_active_label ON labels (item_id) WHERE undone IS NULL;
CREATE INDEX IF NOT EXISTS labels_by_annotator ON labels (annotator, id);
"""


class NotFound(LookupError):
    """No such item (HTTP 404)."""


class Conflict(RuntimeError):
    """The request contradicts the store's state: already labeled, another annotator's item (HTTP 409)."""


class Invalid(ValueError):
    """A label that does not fit its item, e.g. a ranking of other responses than those shown (HTTP 422)."""


class Unwritable(UserError):
    """The disk refused a write (read-only, no permission, I/O error); nothing of it was kept (HTTP 503;
    on the command line, one `error:` line)."""


class DiskFull(Unwritable):
    """No space left for a write; nothing of it was kept (HTTP 507)."""


@dataclass
class Item:
    prompt: list[dict]
    responses: list[str]
    finished: list[bool]
    gold: list[float] | None
    prompt_index: int
    id: int | None = None
    model: str = ""
    source: str = ""
    annotator: str = ""

    def public(self) -> dict:
        """What the page shows: never the gold reward (it would bias the annotator)."""
        return {"item_id": self.id, "prompt": self.prompt, "responses": self.responses, "finished": self.finished,
                "model": self.model, "source": self.source, "prompt_index": self.prompt_index,
                "world": self.gold is not None}


def check_ranking(ranking, k: int) -> list[int]:
    """A full ranking of k responses: a permutation of 0..k-1, best first."""
    if not isinstance(ranking, list) or any(isinstance(x, bool) or not isinstance(x, int) for x in ranking) \
            or sorted(ranking) != list(range(k)):
        raise Invalid(f"ranking {json.dumps(ranking)[:80]} does not match the {k} responses shown: expected each "
                      f"of 0..{k - 1} exactly once, best first")
    return list(ranking)


def gold_agreement(labels: list[tuple[list[int], list[float]]]) -> tuple[int, int]:
    """(agreeing pairs, pairs) over the pairs each ranking implies whose gold rewards differ:
    a pair agrees when the response ranked higher has the higher gold reward."""
    agree = total = 0
    for ranking, gold in labels:
        for i, better in enumerate(ranking):
            for worse in ranking[i + 1:]:
                if gold[better] != gold[worse]:
                    total += 1
                    agree += gold[better] > gold[worse]
    return agree, total


class FeedbackStore:
    """RUN/feedback.sqlite, safe to share between threads (one connection per thread)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        try:
            _create_or_upgrade(self._db(), self.path)
        except Unwritable as e:  # at startup: a one-line error, not a traceback
            raise UserError(str(e)) from None

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            try:
                db = _connect(self.path)
            except (sqlite3.Error, OSError) as e:
                raise _refused(e, self.path) or e
            self._local.db = db
        return db

    def _write(self):
        return _Transaction(self._db(), self.path)

    # --- items: what is shown ------------------------------------------------------------------

    def next_prompt_index(self) -> int:
        return self._db().execute("SELECT COALESCE(MAX(prompt_index), -1) + 1 FROM items").fetchone()[0]

    def add_items(self, annotator: str, items: list[Item], model: str, source: str) -> list[Item]:
        now = time.time()
        with self._write() as db:
            for it in items:
                cur = db.execute(
                    "INSERT INTO items (annotator, prompt_index, prompt, responses, finished, gold, model, source,"
                    " created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (annotator, it.prompt_index, _dump(it.prompt), _dump(it.responses), _dump(it.finished),
                     None if it.gold is None else _dump(it.gold), model, source, now))
                it.id, it.model, it.source, it.annotator = cur.lastrowid, model, source, annotator
        return items

    def get_item(self, item_id: int) -> Item:
        row = self._db().execute(f"SELECT {_ITEM_COLUMNS} FROM items WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            raise NotFound(f"no item {item_id}")
        return _item(row)

    def next_item(self, annotator: str) -> Item | None:
        """The annotator's oldest item without a standing label (an undone one comes back first)."""
        row = self._db().execute(
            f"SELECT {_ITEM_COLUMNS} FROM items i WHERE annotator = ? AND NOT EXISTS "
            "(SELECT 1 FROM labels l WHERE l.item_id = i.id AND l.undone IS NULL) ORDER BY id LIMIT 1",
            (annotator,)).fetchone()
        return None if row is None else _item(row)

    # --- labels --------------------------------------------------------------------------------

    def label(self, item_id: int, annotator: str, status: str, ranking: list[int] | None = None,
              responses: list[str] | None = None) -> int:
        """Record one judgement in its own transaction; returns the label id. `responses`, when
        given, must be exactly the item's (a stale page cannot label what it did not show)."""
        if status not in STATUSES:
            raise Invalid(f"status {status!r}: expected one of {', '.join(STATUSES)}")
        with self._write() as db:
            row = db.execute(f"SELECT {_ITEM_COLUMNS} FROM items WHERE id = ?", (item_id,)).fetchone()
            if row is None:
                raise NotFound(f"no item {item_id}")
            item = _item(row)
            if item.annotator != annotator:
                raise Conflict(f"item {item_id} was shown to {item.annotator!r}, not {annotator!r}")
            if responses is not None and list(responses) != item.responses:
                raise Invalid(f"the responses sent do not match the {len(item.responses)} shown for item {item_id}")
            if status == "ranked":
                ranking = check_ranking(ranking, len(item.responses))
            elif ranking:
                raise Invalid(f"status {status} takes no ranking, got {json.dumps(ranking)[:80]}")
            else:
                ranking = None
            if db.execute("SELECT 1 FROM labels WHERE item_id = ? AND undone IS NULL", (item_id,)).fetchone():
                raise Conflict(f"item {item_id} is already labeled (undo the label to change it)")
            cur = db.execute(
                "INSERT INTO labels (item_id, annotator, prompt, responses, finished, gold, model, status, ranking,"
                " created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (item_id, annotator, _dump(item.prompt), _dump(item.responses), _dump(item.finished),
                 None if item.gold is None else _dump(item.gold), item.model, status,
                 None if ranking is None else _dump(ranking), time.time()))
            return cur.lastrowid

    def undo(self, annotator: str) -> dict | None:
        """Mark the annotator's most recent standing label undone; its item is shown again.
        Returns {label_id, item_id, status} or None when there is nothing to undo."""
        with self._write() as db:
            row = db.execute("SELECT id, item_id, status FROM labels WHERE annotator = ? AND undone IS NULL "
                             "ORDER BY id DESC LIMIT 1", (annotator,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE labels SET undone = ? WHERE id = ?", (time.time(), row[0]))
        return {"label_id": row[0], "item_id": row[1], "status": row[2]}

    def stats(self, annotator: str | None = None) -> dict:
        """Progress: standing labels by status (the annotator's and everyone's), items waiting,
        and for world prompts the annotator's agreement with the gold reward."""
        db = self._db()
        everyone = Counter(dict(db.execute(
            "SELECT status, COUNT(*) FROM labels WHERE undone IS NULL GROUP BY status").fetchall()))
        out = {"total": sum(everyone.values()), "total_by_status": {s: everyone.get(s, 0) for s in STATUSES},
               "prompts_labeled": db.execute("SELECT COUNT(DISTINCT i.prompt_index) FROM labels l JOIN items i "
                                             "ON i.id = l.item_id WHERE l.undone IS NULL").fetchone()[0]}
        if annotator is not None:
            mine = Counter(dict(db.execute("SELECT status, COUNT(*) FROM labels WHERE undone IS NULL AND annotator = ? "
                                           "GROUP BY status", (annotator,)).fetchall()))
            ranked = [(json.loads(r), json.loads(g)) for r, g in db.execute(
                "SELECT ranking, gold FROM labels WHERE undone IS NULL AND annotator = ? AND status = 'ranked' "
                "AND gold IS NOT NULL", (annotator,))]
            agree, pairs = gold_agreement(ranked)
            pending = db.execute("SELECT COUNT(*) FROM items i WHERE annotator = ? AND NOT EXISTS (SELECT 1 FROM "
                                 "labels l WHERE l.item_id = i.id AND l.undone IS NULL)", (annotator,)).fetchone()[0]
            out.update({"annotator": annotator, "labeled": sum(mine.values()),
                        "by_status": {s: mine.get(s, 0) for s in STATUSES}, "pending": pending,
                        "gold_pairs": pairs, "gold_agree": agree,
                        "gold_agreement": agree / pairs if pairs else None})
        return out


class _Transaction:
    """`with _Transaction(db, path) as db:` BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any exception;
    a write the disk refused comes out as DiskFull / Unwritable. IMMEDIATE takes the write lock up
    front, so two writers never deadlock upgrading a read."""

    def __init__(self, db: sqlite3.Connection, path: Path):
        self.db, self.path = db, path

    def __enter__(self) -> sqlite3.Connection:
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise _refused(e, self.path) or e
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            try:
                self.db.execute("COMMIT")
                return
            except sqlite3.Error as e:
                exc = e
        try:
            if self.db.in_transaction:  # SQLite rolls back by itself after some errors (a full disk)
                self.db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the error that got us here is the one to report
        refused = _refused(exc, self.path)
        if refused is not None:
            raise refused from exc
        if exc_type is None:
            raise exc  # a COMMIT that failed for another reason


def _refused(e: BaseException, path: Path) -> Unwritable | None:
    """DiskFull / Unwritable when `e` means the disk refused a write, else None. SQLite writes in
    C, so a full disk (ENOSPC) reaches Python as SQLITE_FULL, not as an OSError."""
    if isinstance(e, sqlite3.Error):
        name, text = getattr(e, "sqlite_errorname", ""), str(e)  # the name from Python 3.11 on
        full = name == "SQLITE_FULL" or "disk is full" in text
        refused = name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_IOERR")) or \
            any(m in text for m in ("readonly database", "disk I/O error", "unable to open database"))
    elif isinstance(e, OSError):
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        refused = e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO)
    else:
        return None
    if full:
        return DiskFull(f"the disk holding {path} is full: nothing of this request was stored; "
                        "free some space, then send it again")
    if refused:
        return Unwritable(f"cannot write {path} ({e}): nothing of this request was stored; check that the "
                          "run directory is writable and its disk is healthy, then send it again")
    return None


def _create_or_upgrade(db: sqlite3.Connection, path: Path) -> None:
    """Create the tables, or bring an older file up to SCHEMA_VERSION, in one transaction (two
    servers starting on the same file cannot half-create it)."""
    with _Transaction(db, path):
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise UserError(f"{path}: feedback schema version {version} comes from a newer gptstack "
                            f"(this one reads up to {SCHEMA_VERSION}); upgrade gptstack")
        for statement in SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        if version == 1:  # labels gained `finished`, copied from their items
            db.execute("ALTER TABLE labels ADD COLUMN finished TEXT NOT NULL DEFAULT '[]'")
            db.execute("UPDATE labels SET finished = (SELECT finished FROM items WHERE items.id = labels.item_id)")
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE / COMMIT), never implicit
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=60)
    db.execute("PRAGMA busy_timeout = 60000")
    mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode.lower() != "wal":
        raise UserError(f"{path}: SQLite cannot use WAL mode here (got {mode}); put the run on a local disk")
    db.execute("PRAGMA synchronous = FULL")  # an acknowledged label survives a crash, not only a kill
    db.execute("PRAGMA foreign_keys = ON")
    return db


_ITEM_COLUMNS = "id, annotator, prompt_index, prompt, responses, finished, gold, model, source"


def _item(row) -> Item:
    id_, annotator, prompt_index, prompt, responses, finished, gold, model, source = row
    return Item(json.loads(prompt), json.loads(responses), json.loads(finished),
                None if gold is None else json.loads(gold), prompt_index, id_, model, source, annotator)


def _dump(value) -> str:
    return json.dumps(value, ensure_ascii=False)


# --- readers for the stages ----------------------------------------------------------------------


def _open_existing(db_path: str | Path) -> sqlite3.Connection:
    path = Path(db_path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise UserError(f"{path}: no feedback database here (expected RUN/{FILENAME}, written by `gptstack serve`)")
    try:
        db = sqlite3.connect(str(path), isolation_level=None, timeout=60)
        db.execute("PRAGMA busy_timeout = 60000")
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as e:
        raise UserError(f"{path}: not a SQLite database ({e}); expected the {FILENAME} "
                        "`gptstack serve` writes") from None
    if not {"items", "labels"} <= tables:
        raise UserError(f"{path}: tables {', '.join(sorted(tables)) or '(none)'}: expected the items and labels "
                        f"tables of a {FILENAME} written by `gptstack serve`")
    _create_or_upgrade(db, path)
    return db


def read_feedback(db_path: str | Path) -> tuple[list[dict], dict]:
    """The standing rankings of RUN/feedback.sqlite (or RUN) as ranking rows, oldest first:
    {"prompt": [messages ending with the user turn], "responses": [...], "ranking": [best first],
    "ended": [per response: the model ended its turn], "gold": [per response] (world prompts only)},
    the shape `data.formats.read_dataset` gives ranking files. Labels marked all bad or skipped,
    and undone labels, are left out and counted; counts has the keys `Dataset.summary()` gives a
    file, so summary.json reads the same either way: data/rows (every label), data/usable (the
    rows returned), data/skipped and data/skipped/{all_bad, skipped, undone}."""
    db = _open_existing(db_path)
    try:
        rows = []
        for prompt, responses, ranking, finished, gold in db.execute(
                "SELECT prompt, responses, ranking, finished, gold FROM labels WHERE undone IS NULL "
                "AND status = 'ranked' ORDER BY id"):
            row = {"prompt": json.loads(prompt), "responses": json.loads(responses), "ranking": json.loads(ranking),
                   "ended": json.loads(finished)}
            if gold is not None:
                row["gold"] = json.loads(gold)
            rows.append(row)
        standing = dict(db.execute("SELECT status, COUNT(*) FROM labels WHERE undone IS NULL GROUP BY status"))
        skipped = {"all_bad": standing.get("all_bad", 0), "skipped": standing.get("skipped", 0),
                   "undone": db.execute("SELECT COUNT(*) FROM labels WHERE undone IS NOT NULL").fetchone()[0]}
        counts = {"data/rows": len(rows) + sum(skipped.values()), "data/usable": len(rows),
                  "data/skipped": sum(skipped.values()), **{f"data/skipped/{k}": v for k, v in skipped.items()}}
    finally:
        db.close()
    return rows, counts


def export_prefs(run_dir: str | Path, out_path: str | Path, kwise: bool = False) -> int:
    """Write RUN/feedback.sqlite's rankings as JSONL, atomically; returns the rows written.

    kwise=False: TRL conversational preference rows, every pair a ranking implies (K(K-1)/2 per
    label, InstructGPT-style): {"prompt": messages, "chosen": [assistant msg], "rejected": [assistant msg]}.
    kwise=True: one ranking row per label: {"prompt", "responses", "ranking", "ended"[, "gold"]}.
    Both are what `gptstack rm --prefs FILE` and `gptstack dpo --prefs FILE` read."""
    from .comparisons import ranking_pairs  # noqa: PLC0415 (comparisons imports this module)

    rows, _ = read_feedback(run_dir)
    lines = []
    for row in rows:
        if kwise:
            lines.append(row)
            continue
        for better, worse in ranking_pairs(row["ranking"]):
            lines.append({"prompt": row["prompt"],
                          "chosen": [{"role": "assistant", "content": row["responses"][better]}],
                          "rejected": [{"role": "assistant", "content": row["responses"][worse]}]})
    atomic_write_text(out_path, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    return len(lines)
