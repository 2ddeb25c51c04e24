"""A disk cache of feedback texts, so that a rerun does not pay for the same request twice."""

from __future__ import annotations

import hashlib
import json
import pathlib
import sqlite3
import threading


def cache_key(provider: str, model: str, prompt: str, params: dict | None = None) -> str:
    """sha256 over (provider, model, generation params, prompt): anything that changes the answer."""
    blob = json.dumps([provider, model, params or {}, prompt], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class FeedbackCache:
    """key -> text in one sqlite file; safe to share between threads (one connection behind a lock) and,
    through sqlite's own locking, between processes."""

    def __init__(self, directory: str | pathlib.Path):
        path = pathlib.Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self.path = path / "feedback_cache.sqlite"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0)
        with self._lock, self._db:
            self._db.execute("CREATE TABLE IF NOT EXISTS feedback (key TEXT PRIMARY KEY, text TEXT NOT NULL)")

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT text FROM feedback WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def put(self, key: str, text: str) -> None:
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO feedback (key, text) VALUES (?, ?)", (key, text))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM feedback").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
