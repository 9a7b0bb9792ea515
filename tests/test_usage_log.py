import os
import sqlite3
import threading
import time

import pytest
import sqlite_utils

from kvchat.records import Eviction
from kvchat.records import Usage
from kvchat.usage_log import UsageLog, migrate


def usage(**fields) -> Usage:
    base = dict(ts=time.time(), session="abc", model="m", prompt_tokens=100, cached_tokens=90,
                cache_source="session", new_tokens=5, ttft_ms=12.0, total_ms=50.0, finish_reason="stop")  # fmt: skip
    return Usage(**{**base, **fields})


def test_rows_and_evictions_are_written_by_migrated_schema(usage_db):
    log = UsageLog(usage_db)
    log.record(usage(), [Eviction("session:x", 4096, 10), Eviction("prefix:ab", 2048, 5)])
    log.record(usage(cached_tokens=0, cache_source="none", ttft_ms=40.0))
    assert log.flush()
    db = sqlite_utils.Database(usage_db)
    assert db["requests"].count == 2
    evictions = list(db["evictions"].rows)
    assert [(e["kind"], e["nbytes"], e["request_id"]) for e in evictions] == [("session", 4096, 1), ("prefix", 2048, 1)]
    assert db.execute("pragma journal_mode").fetchone()[0] == "wal"
    assert migrate(db) == []  # already applied: nothing runs twice
    summary = log.summary()
    assert (summary.requests, summary.warm_requests, summary.cold_requests) == (2, 1, 1)
    assert summary.median_ttft_cold_ms == 40.0 and summary.token_hit_rate == pytest.approx(90 / 200)
    log.close()


def test_text_is_stored_only_when_asked(tmp_path):
    for store_text in (False, True):
        path = tmp_path / f"{store_text}.db"
        log = UsageLog(path, store_text=store_text)
        log.record(usage(), user_text="my secret question", reply_text="an answer")
        log.close()
        row = next(sqlite_utils.Database(path)["requests"].rows)
        assert (row["user_text"] == "my secret question") is store_text


def test_unwritable_database_warns_once_and_never_raises(tmp_path):
    log = UsageLog(tmp_path / "missing-dir" / "usage.db")
    for _ in range(3):
        log.record(usage())
    assert log.flush()
    assert log.rows_failed == 3 and log.rows_written == 0
    assert "not written" in log.warning
    assert log.summary().requests == 0  # nothing to read, and no exception


def test_deleted_file_is_recreated_and_later_rows_land(usage_db):
    log = UsageLog(usage_db)
    log.record(usage())
    assert log.flush()
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(f"{usage_db}{suffix}"):
            os.remove(f"{usage_db}{suffix}")
    log.record(usage())
    log.record(usage())
    log.close()
    assert sqlite_utils.Database(usage_db)["requests"].count == 2
    assert log.rows_written == 3


def test_locked_database_waits_for_the_other_writer(usage_db, monkeypatch):
    inserting = threading.Event()  # set when a connection starts an INSERT: the log's writer, in this test
    connect = sqlite3.connect

    def traced(*args, **kwargs) -> sqlite3.Connection:
        conn = connect(*args, **kwargs)
        conn.set_trace_callback(lambda sql: sql.lstrip().upper().startswith("INSERT") and inserting.set())
        return conn

    monkeypatch.setattr(sqlite3, "connect", traced)
    log = UsageLog(usage_db)
    log.record(usage())
    assert log.flush()
    blocker = sqlite3.connect(usage_db)
    blocker.execute("begin exclusive")
    inserting.clear()
    log.record(usage())  # returns at once: the writer thread waits, not the chat
    assert inserting.wait(30), "the writer never tried to write the row"
    # the writer is at the lock: a short look shows it waits there instead of giving up on the row
    assert not log.flush(timeout_s=0.2), "the row was written or dropped while the other writer held the lock"
    blocker.rollback()
    blocker.close()
    log.close()
    assert sqlite_utils.Database(usage_db)["requests"].count == 2
    assert log.warning is None


def test_lock_held_past_the_busy_timeout_loses_only_that_row(usage_db, monkeypatch):
    from kvchat import usage_log

    monkeypatch.setattr(usage_log, "BUSY_TIMEOUT_S", 0.3)
    log = UsageLog(usage_db)
    log.record(usage())
    assert log.flush()
    blocker = sqlite3.connect(usage_db)
    blocker.execute("begin exclusive")
    log.record(usage())  # cannot be written while the other writer holds the lock
    assert log.flush()
    blocker.rollback()
    blocker.close()
    log.record(usage())
    log.close()
    assert (log.rows_written, log.rows_failed) == (2, 1)
    assert "locked" in log.warning
    assert sqlite_utils.Database(usage_db)["requests"].count == 2


def _chattr(flag: str, *paths) -> bool:
    import subprocess

    return subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True).returncode == 0


def test_read_only_database_warns_once_and_rows_resume_when_writable(tmp_path):
    path = tmp_path / "usage.db"
    first = UsageLog(path)
    first.record(usage())
    first.close()
    if not _chattr("+i", path, tmp_path):  # immutable binds root too; permission bits would not
        pytest.skip("this filesystem cannot make a file immutable (chattr +i), so read-only cannot be simulated")
    try:
        log = UsageLog(path)
        for _ in range(3):
            log.record(usage())
        assert log.flush()
        assert (log.rows_written, log.rows_failed) == (0, 3)
        assert "not written" in log.warning
    finally:
        _chattr("-i", path, tmp_path)
    log.record(usage())
    log.close()
    assert log.rows_written == 1
    assert sqlite_utils.Database(path)["requests"].count == 2


FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing us
from kvchat.records import Usage
from kvchat.usage_log import UsageLog
log = UsageLog(sys.argv[1], store_text=True)
row = Usage(ts=0.0, session="s", model="m", prompt_tokens=1, finish_reason="stop")
log.record(row, user_text="first")
log.flush()
resource.setrlimit(resource.RLIMIT_FSIZE, (120_000, 120_000))
for _ in range(200):
    log.record(row, user_text="y" * 2000)
log.close()
print(log.rows_written, log.rows_failed, log.warning)
"""


def test_full_disk_keeps_every_row_that_fits_and_warns(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "usage.db"
    result = subprocess.run([sys.executable, "-c", FULL_DISK, str(path)], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    written, failed, warning = result.stdout.split(" ", 2)
    assert int(failed) > 0 and int(written) > 1
    assert "full" in warning or "too large" in warning
    assert sqlite_utils.Database(path)["requests"].count == int(written)
