"""The disk tier: cached KV that outlives memory and restarts, and is never served wrong.

One file per tree node, in the safetensors format (a JSON header, then raw tensors; read back
through `safetensors.safe_open`, which maps the file and never unpickles anything):
`token_ids` [n] int32, then `k.<layer>` and `v.<layer>` [kv_heads, n, head_dim], and in the
header's metadata the format version, the model fingerprint, the node's key, its parent's key,
scope and owner, and an xxh3 checksum of every tensor byte. Files are written by hand in that
layout (the library's writer first copies every tensor into one bytes object: a whole node's
size in extra RAM) to a temporary name, then renamed into place, readable by the owner only.

An index (SQLite through sqlite-utils, next to the files) lists every complete file: key, parent
key, scope, owner, token ids, bytes, last use. It is a cache of the files' own headers: at start
it is reconciled with them (half-written, missing, truncated, foreign or unreadable files are
dropped with one warning; a file the index lost is re-listed from its header), and a deleted
index is rebuilt. Every read checks the fingerprint, the key, the token ids and the checksum.

The directory is per model fingerprint (a content hash of the weights, dtype, chat template and
this format's version): a file made by another model or dtype is never loaded. One process owns
a directory at a time (an advisory lock); a second one runs without the disk tier and says why.

All writing happens on one background thread (like the usage log), so a reply never waits for
the disk. Which nodes go to disk, and when, is `tier.py`; their bytes under the disk budget are
counted in the tree (`copies.py`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import queue
import sqlite3
import threading
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import sqlite_utils
import torch
import xxhash
from safetensors import safe_open

from kvchat.kv.runs import KVRun

log = logging.getLogger(__name__)

FORMAT = "kvchat-kv/1"  # part of the model fingerprint too: a new layout never reads old files
SUFFIX = ".safetensors"
_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int32: "I32"}


class DiskUnavailable(Exception):
    """The disk tier cannot be used (unwritable directory, another process owns it)."""


@dataclass(frozen=True, slots=True)
class StoredRun:
    """One complete file, as the index lists it."""

    key: str  # xxh3-128 of (scope, owner, every token id from the root): stable across restarts
    parent_key: str  # "" under the scope's root
    scope: str
    owner: str  # SHARED, STATELESS or a hashed session id (never a session id in clear)
    token_ids: tuple[int, ...]  # this node's own ids
    nbytes: int  # bytes of its KV tensors
    file_nbytes: int
    created_s: float
    last_used_s: float
    hits: int


def file_key(scope: str, owner: str, path_ids: Iterable[int]) -> str:
    """A node's name on disk: the same conversation prefix gets the same key after a restart."""
    digest = xxhash.xxh3_128()
    digest.update(f"{scope}\x00{owner}\x00".encode())
    digest.update(array("i", path_ids).tobytes())
    return digest.hexdigest()


class DiskStore:
    """Files + index in `directory/<fingerprint>/`, one writer thread. Thread-safe."""

    def __init__(self, directory: Path, fingerprint: str, layers: int) -> None:
        self.directory = Path(directory).expanduser() / fingerprint
        self.fingerprint = fingerprint
        self.layers = layers
        self.problems: list[str] = []  # what went wrong, for the operator (shown once each)
        self._records: dict[str, StoredRun] = {}
        self._lock = threading.Lock()
        self._lock_file = self._take_directory()
        self._db = self._open_index()
        self._reconcile()
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._drain, name="kvchat-disk", daemon=True)
        self._thread.start()

    # --- reading (any thread) ---
    def records(self) -> list[StoredRun]:
        """Every complete file, parents before children."""
        with self._lock:
            by_key = dict(self._records)
        depth: dict[str, int] = {}

        def depth_of(key: str) -> int:
            if key not in depth:
                parent = by_key[key].parent_key
                depth[key] = 0 if parent not in by_key else 1 + depth_of(parent)
            return depth[key]

        return sorted(by_key.values(), key=lambda record: depth_of(record.key))

    @property
    def file_nbytes(self) -> int:
        with self._lock:
            return sum(record.file_nbytes for record in self._records.values())

    def read(self, key: str, token_ids: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> KVRun | None:
        """The KV of `key`, verified; None (and the file dropped, with a warning) if it is missing,
        foreign, corrupt or not these ids."""
        path = self._path(key)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                meta = handle.metadata() or {}
                ids = handle.get_tensor("token_ids")
                keys = [handle.get_tensor(f"k.{layer}") for layer in range(self.layers)]
                values = [handle.get_tensor(f"v.{layer}") for layer in range(self.layers)]
        except Exception as err:  # noqa: BLE001 - any unreadable file is dropped, never raised
            return self._bad(key, f"could not be read ({type(err).__name__}: {err})")
        if meta.get("format") != FORMAT or meta.get("fingerprint") != self.fingerprint or meta.get("key") != key:
            return self._bad(key, "was made by another model, dtype or kvchat version")
        if tuple(ids.tolist()) != tuple(token_ids):
            return self._bad(key, "held other token ids than its index entry")
        if any(t.dtype != dtype or t.shape[1] != len(token_ids) for t in (*keys, *values)):
            return self._bad(key, "had the wrong dtype or shape")
        if meta.get("checksum") != _checksum([ids, *keys, *values]):
            return self._bad(key, "failed its checksum (corrupted on disk)")
        if device.type != "cpu":
            keys = [t.to(device, non_blocking=True) for t in keys]
            values = [t.to(device, non_blocking=True) for t in values]
        return KVRun(keys, values)

    # --- changing (queued to the writer thread) ---
    def write(self, record: StoredRun, run: KVRun, on_done: Callable[[bool], None]) -> None:
        """Write `run` as `record`'s file in the background; `on_done(ok)` when it is complete."""
        self._jobs.put(lambda: on_done(self._write(record, run)))

    def delete(self, key: str) -> None:
        self._jobs.put(lambda: self._delete(key))

    def touch(self, uses: list[tuple[str, float, int]]) -> None:
        """Record (key, last use, hits) so a restart orders eviction as before."""
        self._jobs.put(lambda: self._touch(uses))

    def flush(self) -> None:
        """Wait until everything queued so far is on disk."""
        done = threading.Event()
        self._jobs.put(done.set)
        done.wait()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()
        self._db.conn.close()
        self._lock_file.close()

    # --- inside ---
    def _path(self, key: str) -> Path:
        return self.directory / f"{key}{SUFFIX}"

    def _problem(self, text: str) -> None:
        log.warning("disk cache: %s", text)
        self.problems.append(text)

    def _take_directory(self):
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            handle = open(self.directory / "lock", "a+")  # noqa: SIM115 - held for the store's life
            os.chmod(handle.fileno(), 0o600)
        except OSError as err:
            raise DiskUnavailable(f"cannot use {self.directory} for the disk cache ({err.strerror or err})") from err
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise DiskUnavailable(
                f"{self.directory} is in use by another kvchat process ({owner}); this one runs without "
                "a disk cache: give it its own --disk-dir"
            ) from err
        handle.truncate(0)
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        return handle

    def _open_index(self) -> sqlite_utils.Database:
        path = self.directory / "index.db"
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        path.chmod(0o600)  # it lists token ids: the owner's only, like the files
        db = sqlite_utils.Database(conn)
        try:
            db["runs"].create(
                {"key": str, "parent_key": str, "scope": str, "owner": str, "token_ids": bytes, "nbytes": int,
                 "file_nbytes": int, "created_s": float, "last_used_s": float, "hits": int, "fingerprint": str},
                pk="key", if_not_exists=True,
            )  # fmt: skip
        except sqlite3.DatabaseError as err:  # a corrupt index is rebuilt from the files' headers
            self._problem(f"the index was unreadable ({err}) and was rebuilt from the files")
            conn.close()
            (self.directory / "index.db").unlink(missing_ok=True)
            return self._open_index()
        return db

    def _reconcile(self) -> None:
        """Make the index and the files agree; drop whatever cannot be trusted."""
        for tmp in self.directory.glob("*.tmp"):
            tmp.unlink(missing_ok=True)  # a write that never finished (kill -9, disk full)
        files = {path.name.removesuffix(SUFFIX): path for path in self.directory.glob(f"*{SUFFIX}")}
        dropped = []
        for row in self._db["runs"].rows:
            record = _record(row)
            path = files.pop(record.key, None)
            if row["fingerprint"] != self.fingerprint or path is None or path.stat().st_size != record.file_nbytes:
                dropped.append(record.key)
                self._db["runs"].delete(record.key)
                if path is not None:
                    path.unlink(missing_ok=True)
                continue
            self._records[record.key] = record
        for key, path in files.items():  # files the index does not list (it was lost or is behind)
            record = self._read_header(key, path)
            if record is None:
                dropped.append(key)
                path.unlink(missing_ok=True)
                continue
            self._records[key] = record
            self._db["runs"].insert(_row(record, self.fingerprint), replace=True)
        while orphans := [r.key for r in self._records.values() if r.parent_key and r.parent_key not in self._records]:
            for key in orphans:  # a run whose parent is gone can never be matched
                self._records.pop(key)
                self._db["runs"].delete(key)
                self._path(key).unlink(missing_ok=True)
        if dropped:
            self._problem(f"{len(dropped)} cached file(s) in {self.directory} were incomplete, corrupt or foreign "
                          "and were removed (nothing wrong was served)")  # fmt: skip

    def _read_header(self, key: str, path: Path) -> StoredRun | None:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                meta = handle.metadata() or {}
                ids = tuple(handle.get_tensor("token_ids").tolist())
            if meta.get("format") != FORMAT or meta.get("fingerprint") != self.fingerprint or meta.get("key") != key:
                return None
            return StoredRun(key, meta["parent_key"], meta["scope"], meta["owner"], ids, int(meta["nbytes"]),
                             path.stat().st_size, float(meta["created_s"]), path.stat().st_mtime, 0)  # fmt: skip
        except Exception:  # noqa: BLE001 - whatever it is, it is not a file we can trust
            return None

    def _bad(self, key: str, why: str) -> None:  # returns None for `read`
        self._problem(f"a cached file was {why}; it was removed and the run recomputed")
        with self._lock:
            self._records.pop(key, None)
        self.delete(key)

    def _drain(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception:  # the disk is a side channel: it never stops the writer
                log.exception("disk cache job failed")

    def _write(self, record: StoredRun, run: KVRun) -> bool:
        tensors = {"token_ids": torch.tensor(record.token_ids, dtype=torch.int32)}  # ids, keys, values: the
        tensors |= {f"k.{i}": t.detach().to("cpu").contiguous() for i, t in enumerate(run.keys)}  # order
        tensors |= {f"v.{i}": t.detach().to("cpu").contiguous() for i, t in enumerate(run.values)}  # `read` hashes
        meta = {"format": FORMAT, "fingerprint": self.fingerprint, "key": record.key, "parent_key": record.parent_key,
                "scope": record.scope, "owner": record.owner, "nbytes": str(record.nbytes),
                "created_s": repr(record.created_s), "checksum": _checksum(tensors.values())}  # fmt: skip
        final, tmp = self._path(record.key), self._path(record.key).with_suffix(".tmp")
        try:
            _write_safetensors(tmp, tensors, meta)
            os.replace(tmp, final)
            record = replace(record, file_nbytes=final.stat().st_size)
            self._db["runs"].insert(_row(record, self.fingerprint), replace=True)
        except (OSError, sqlite3.Error) as err:
            for path in (tmp, final):  # nothing half-done stays: no file without its index row
                path.unlink(missing_ok=True)
            if not any(p.startswith("cannot write") for p in self.problems):
                self._problem(f"cannot write to {self.directory} ({getattr(err, 'strerror', None) or err}); "
                              "runs stay in memory only until it can")  # fmt: skip
            return False
        with self._lock:
            self._records[record.key] = record
        return True

    def _delete(self, key: str) -> None:
        with self._lock:
            self._records.pop(key, None)
        try:  # the row first: a kill between the two leaves a valid file, listed again at start
            self._db["runs"].delete_where("key = ?", [key])
            self._path(key).unlink(missing_ok=True)
        except (OSError, sqlite3.Error) as err:
            log.warning("disk cache: could not delete %s: %s", key, err)

    def _touch(self, uses: list[tuple[str, float, int]]) -> None:
        with self._db.conn:
            for key, last_used_s, hits in uses:
                self._db.execute("update runs set last_used_s = ?, hits = ? where key = ?", [last_used_s, hits, key])


def _record(row: dict) -> StoredRun:
    ids = array("i")
    ids.frombytes(row["token_ids"])
    return StoredRun(row["key"], row["parent_key"], row["scope"], row["owner"], tuple(ids), row["nbytes"],
                     row["file_nbytes"], row["created_s"], row["last_used_s"], row["hits"])  # fmt: skip


def _row(record: StoredRun, fingerprint: str) -> dict:
    return {"key": record.key, "parent_key": record.parent_key, "scope": record.scope, "owner": record.owner,
            "token_ids": array("i", record.token_ids).tobytes(), "nbytes": record.nbytes,
            "file_nbytes": record.file_nbytes, "created_s": record.created_s, "last_used_s": record.last_used_s,
            "hits": record.hits, "fingerprint": fingerprint}  # fmt: skip


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def _checksum(tensors: Iterable[torch.Tensor]) -> str:
    digest = xxhash.xxh3_64()
    for tensor in tensors:
        digest.update(_bytes_of(tensor))
    return digest.hexdigest()


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """The safetensors layout: 8-byte little-endian header size, JSON header, raw tensor bytes."""
    header: dict[str, object] = {"__metadata__": meta}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for tensor in tensors.values():
            handle.write(_bytes_of(tensor))

