"""A reply cache in SQLite, so a re-run with the same model, messages, sampling and seed needs no LLM.

WAL mode and a busy timeout let several search processes share one cache file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .base import ChatModel, Message, Reply, Sampling

_BUSY_TIMEOUT_S = 60.0


def cache_key(identity: str, messages: list[Message], sampling: Sampling) -> str:
    text = json.dumps([identity, messages, dataclasses.asdict(sampling)], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _enable_wal(db: sqlite3.Connection) -> None:
    """WAL persists in the file, so only its creation can race; the mode switch ignores the busy timeout: retry."""
    deadline = time.monotonic() + _BUSY_TIMEOUT_S
    while db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        try:
            db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class CachedChat:
    """Wraps a ChatModel; a hit returns the stored reply (tokens and original seconds kept) with cached=True."""

    def __init__(self, inner: ChatModel, path: str | Path):
        self.inner = inner
        self._checked = False
        self.identity = inner.identity
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            _enable_wal(db)
            db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, text TEXT NOT NULL, "
                       "tokens_in INTEGER NOT NULL, tokens_out INTEGER NOT NULL, seconds REAL NOT NULL, "
                       "truncated INTEGER NOT NULL)")

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """A connection per use: cheap next to an LLM call, and safe across threads and processes."""
        db = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S)
        try:
            with db:
                yield db
        finally:
            db.close()

    def check(self) -> None:
        """Deferred to the first reply the cache lacks, so a cached run replays without the server or weights."""

    def chat(self, messages: list[Message], sampling: Sampling) -> Reply:
        key = cache_key(self.identity, messages, sampling)
        with self._db() as db:
            row = db.execute("SELECT text, tokens_in, tokens_out, seconds, truncated FROM replies WHERE key = ?",
                             (key,)).fetchone()
        if row is not None:
            return Reply(row[0], row[1], row[2], row[3], cached=True, truncated=bool(row[4]))
        if not self._checked:
            self.inner.check()
            self._checked = True
        reply = self.inner.chat(messages, sampling)
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?, ?, ?)",
                       (key, reply.text, reply.tokens_in, reply.tokens_out, reply.seconds, int(reply.truncated)))
        return reply
