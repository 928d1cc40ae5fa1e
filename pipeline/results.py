"""The results side of a run: committed shards, the shard writer, the output lock and run records.

Layout under the output URL: part-<n>.parquet shards (the result table) and `_`-prefixed folders that
readers skip: `_runs/LOCK`, `_runs/<run_id>/<record>`, `_tmp/` (local temp files before their rename).
A run of one adapter shard (pipeline.plan.AdapterShard, tag s<i>of<n>) writes part-<tag>-<n>.parquet under
`_runs/LOCK-<tag>` and keeps its records in `_runs/<run_id>/<tag>/`, so the shards of a night run at once."""
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone

import pyarrow as pa

from engine.request import RequestOutput
from pipeline.requests import PassThrough
from pipeline.schema import RESULT_SCHEMA, SCORING_COLUMNS
from pipeline.storage import (create_exclusive, filesystem, join, parquet_bytes, probe_writable, publish, read_parquet,
                              visible_files)

log = logging.getLogger(__name__)
SHARD_NAME = re.compile(r"part-(?:(?P<tag>s\d+of\d+)-)?(?P<index>\d+)\.parquet")


class ResultStore:
    """The committed shards under one output URL."""

    def __init__(self, output_url: str, storage_options: dict | None = None):
        self.url = output_url
        self.fs, self.root = filesystem(output_url, storage_options)

    def shard_paths(self) -> list[str]:
        if not self.fs.isdir(self.root):
            return []
        return [p for p in visible_files(self.fs, self.root) if SHARD_NAME.fullmatch(p.rsplit("/", 1)[-1])]

    def read_columns(self, columns: list[str]) -> pa.Table:
        """These columns of every committed row, duplicates included (an empty table when none)."""
        tables = [RESULT_SCHEMA.empty_table().select(columns)]
        for path in self.shard_paths():
            tables.append(read_parquet(self.fs, path, columns))
        return pa.concat_tables(tables, promote_options="permissive")

    def committed_ids(self) -> set[str]:
        """request_ids of every committed row (reads only that column)."""
        return set(self.read_columns(["request_id"]).column(0).to_pylist()) - {None}

    def next_shard_index(self, tag: str = "") -> int:
        names = [SHARD_NAME.fullmatch(p.rsplit("/", 1)[-1]) for p in self.shard_paths()]
        return max((int(m["index"]) for m in names if (m["tag"] or "") == tag), default=-1) + 1

    def shard_path(self, index: int, tag: str = "") -> str:
        return join(self.root, f"part-{tag + '-' if tag else ''}{index:06d}.parquet")


class OutputWriteError(Exception):
    """The output stopped taking writes mid-run (disk full, turned read-only, permission withdrawn). The shards
    committed before it stay; str(e) is one line naming the output and the cause."""


class ShardWriter:
    """Buffers result rows and commits them as shards: when rows_per_shard rows are buffered, when the
    oldest buffered row has waited seconds_per_shard, and on exit (an exception included). The pass-through
    columns of each row are taken from `pass_through` as Arrow, so every shard of a run has one schema."""

    def __init__(self, store: ResultStore, run_id: str, base_model: str, pass_through: PassThrough | None = None,
                 rows_per_shard: int = 256, seconds_per_shard: float = 30.0, tag: str = ""):
        self.store, self.run_id, self.base_model, self.tag = store, run_id, base_model, tag
        self.pass_through = pass_through or PassThrough()
        self.schema = pa.schema(list(RESULT_SCHEMA) + list(self.pass_through.table.schema))
        self.rows_per_shard, self.seconds_per_shard = rows_per_shard, seconds_per_shard
        self.next_index = store.next_shard_index(tag)
        self.buffer: list[tuple[RequestOutput, datetime]] = []
        self.buffer_since = 0.0
        self.rows_written = 0
        self.shards_written = 0

    def add(self, output: RequestOutput) -> None:
        if not self.buffer:
            self.buffer_since = time.monotonic()
        self.buffer.append((output, datetime.now(timezone.utc)))
        if len(self.buffer) >= self.rows_per_shard or time.monotonic() - self.buffer_since >= self.seconds_per_shard:
            self.commit()

    def commit(self) -> None:
        """Write the buffer as the next shard; a reader sees the whole shard or nothing. A failed write keeps
        the buffer (a later commit tries again) and raises OutputWriteError."""
        if not self.buffer:
            return
        path = self.store.shard_path(self.next_index, self.tag)
        try:
            publish(self.store.fs, path, parquet_bytes(self._table()), join(self.store.root, "_tmp"))
        except OSError as e:
            raise OutputWriteError(f"cannot write {self.store.url}: {_describe(e)}") from e
        # In this order, an interrupt between any two lines rewrites this very shard at most, never a second one.
        rows, self.buffer = len(self.buffer), []
        self.next_index += 1
        self.rows_written += rows
        self.shards_written += 1

    def _table(self) -> pa.Table:
        outputs = [o for o, _ in self.buffer]
        columns = {
            "request_id": [o.request_id for o in outputs],
            "adapter_id": [o.adapter_id for o in outputs],
            "output_text": [o.output_text for o in outputs],
            "output_token_ids": [list(o.output_token_ids) for o in outputs],
            "prompt_tokens": [o.prompt_tokens for o in outputs],
            "output_tokens": [o.output_tokens for o in outputs],
            "finish_reason": [o.finish_reason for o in outputs],
            "error": [o.error for o in outputs],
            "base_model": [self.base_model] * len(outputs),
            "adapter_sha256": [o.adapter_sha256 for o in outputs],
            **{name: [getattr(o, name) for o in outputs] for name in SCORING_COLUMNS},
            "run_id": [self.run_id] * len(outputs),
            "completed_at": [t for _, t in self.buffer],
        }
        results = pa.Table.from_pydict(columns, schema=RESULT_SCHEMA)
        extra = self.pass_through.rows(columns["request_id"])
        return pa.Table.from_arrays(results.columns + extra.columns, schema=self.schema)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.commit()  # completed rows are kept even when the run fails


def _describe(error: OSError) -> str:
    """An OSError in a few words: 'No space left on device' rather than '[Errno 28] ...: /a/long/tmp/path'."""
    return error.strerror or str(error) or type(error).__name__


def write_run_record(output_url: str, run_id: str, name: str, content: str | bytes,
                     storage_options: dict | None = None, tag: str = "") -> str:
    """Write <output>/_runs/<run_id>/[<tag>/]<name>; returns its URL."""
    if name.endswith(".parquet"):
        # `<out>/**/*.parquet` globs (Polars, DuckDB) do not skip `_` folders: keep Parquet out of _runs
        raise ValueError(f"run record {name!r}: run records must not be Parquet files")
    fs, root = filesystem(output_url, storage_options)
    path = join(root, "_runs", run_id, *([tag] if tag else []), name)
    try:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, content.encode() if isinstance(content, str) else content)
    except OSError as e:
        raise OutputWriteError(f"cannot write {output_url}: {_describe(e)}") from e
    return fs.unstrip_protocol(path)


class OutputUnavailable(Exception):
    """Another live run is writing this output, or the output cannot be written at all."""


@contextmanager
def output_lock(output_url: str, storage_options: dict | None = None, tag: str = "", *,
                heartbeat_s: float = 10.0, stale_after_s: float = 120.0):
    """Hold <output>/_runs/LOCK[-<tag>] while the block runs, so two runs never write one output (or shard).

    A lock whose holder is gone is taken over with a warning: its pid is dead on this host, or its
    heartbeat (refreshed every heartbeat_s from a background thread) is older than stale_after_s."""
    fs, root = filesystem(output_url, storage_options)
    path = join(root, "_runs", f"LOCK-{tag}" if tag else "LOCK")
    holder = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "token": uuid.uuid4().hex, "heartbeat": time.time()}
    try:
        probe_writable(fs, root)   # before any work: the output takes shards, not just the lock's folder
        _acquire(fs, root, path, holder, output_url, stale_after_s)
    except OSError as e:   # no permission, read-only storage, a file where the folder should be
        raise OutputUnavailable(f"cannot write {output_url}: {_describe(e)}") from None
    stop = threading.Event()

    def beat():
        while not stop.wait(heartbeat_s):
            holder["heartbeat"] = time.time()
            try:
                if _read_lock(fs, path).get("token") != holder["token"]:
                    log.error("output lock %s was taken over by another run", path)
                    return
                publish(fs, path, json.dumps(holder).encode(), join(root, "_runs"))
            except Exception as e:  # noqa: BLE001 - a failed heartbeat must not kill the run; retried next beat
                log.warning("could not refresh output lock %s: %s", path, e)

    thread = threading.Thread(target=beat, name="lorafleet-lock-heartbeat", daemon=True)
    thread.start()
    try:
        yield holder
    finally:
        stop.set()
        thread.join()
        _release(fs, path, holder)


def _release(fs, path: str, holder: dict) -> None:
    try:
        if _read_lock(fs, path).get("token") == holder["token"]:
            fs.rm_file(path)
    except OSError as e:   # gone already, or the storage stopped taking writes: a rerun takes the lock over
        if not isinstance(e, FileNotFoundError):
            log.warning("could not remove the output lock %s: %s", path, _describe(e))


def _read_lock(fs, path: str) -> dict:
    fs.invalidate_cache(path)
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return {}
    except ValueError:  # half-written by a holder that died while writing: nobody holds it
        return {"heartbeat": 0}


def _acquire(fs, root: str, path: str, holder: dict, output_url: str, stale_after_s: float) -> None:
    data = json.dumps(holder).encode()
    try:
        create_exclusive(fs, path, data)
    except FileExistsError:
        current = _read_lock(fs, path)
        if not _is_stale(current, stale_after_s):
            raise OutputUnavailable(
                f"{output_url} is being written by another run (host {current.get('host')}, pid {current.get('pid')}, "
                f"started {current.get('started')}); wait for it to finish, or use another --output") from None
        log.warning("taking over the stale output lock of %s (host %s, pid %s, started %s)",
                    output_url, current.get("host"), current.get("pid"), current.get("started"))
        publish(fs, path, data, join(root, "_runs"))
    time.sleep(0.05)  # let a racing writer's PUT land, then confirm the lock is ours
    current = _read_lock(fs, path)
    if current.get("token") != holder["token"]:
        raise OutputUnavailable(f"{output_url} was locked by another run starting at the same moment "
                                f"(host {current.get('host')}, pid {current.get('pid')}); try again later")
    for other in fs.glob(join(root, "_runs", "LOCK*")):
        # Shards of one split run side by side; a whole run, or a split into another count, would redo their rows.
        if _split_of(other) != _split_of(path) and not _is_stale(lock := _read_lock(fs, other), stale_after_s):
            fs.rm_file(path)
            raise OutputUnavailable(f"{output_url} is being written by another run split another way ("
                               f"{other.rsplit('/', 1)[-1]}: host {lock.get('host')}, pid {lock.get('pid')}); "
                               "wait for it, or run with the same --adapter-shard count")


def _split_of(lock_path: str) -> int:
    """Into how many adapter shards the run holding this lock splits the night: LOCK-s<i>of<n> -> n, LOCK -> 1."""
    return int(lock_path.rsplit("of", 1)[1]) if "of" in lock_path.rsplit("/", 1)[-1] else 1


def _is_stale(lock: dict, stale_after_s: float) -> bool:
    if not lock:
        return True
    if time.time() - lock.get("heartbeat", 0) > stale_after_s:
        return True
    if lock.get("host") == socket.gethostname():
        try:
            os.kill(lock["pid"], 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, TypeError):
            pass
    return False
