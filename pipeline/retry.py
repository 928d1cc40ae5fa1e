"""Which committed rows a run counts as done, and `--retry-errors`: error rows run again, their new rows
supersede the old ones.

A retry commits its new rows first (as any run does), then rewrites the shards that hold the old rows without
them. Each shard is rewritten atomically (pipeline.storage.publish), so a crash leaves every committed row
readable and at worst a request with two rows for a while: every run starts by superseding those (they can
only come from a retry), so a crashed retry, resumed with or without `--retry-errors`, ends with one row per
request_id. Rewrites only ever remove rows that have a better one: nothing that is needed is lost."""
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass

import pyarrow as pa

from pipeline.results import ResultStore
from pipeline.storage import join, parquet_bytes, publish, read_parquet


@dataclass
class Committed:
    """What an output already holds, for one run."""
    done: set[str]              # request ids the run skips
    retried: set[str]           # ids whose rows are all errors, run again (with retry_errors; else empty)
    duplicated: set[str]        # ids with more than one row: a retry that has not superseded its old rows yet
    rows_without_id: int        # error rows of requests that had no request_id (they are never retried)


def read_committed(store: ResultStore, retry_errors: bool = False) -> Committed:
    """One read of the committed ids (and, to retry, their finish_reason)."""
    table = store.read_columns(["request_id", "finish_reason"] if retry_errors else ["request_id"])
    ids = table.column("request_id").to_pylist()
    counts = Counter(i for i in ids if i is not None)
    duplicated = {i for i, n in counts.items() if n > 1}
    if not retry_errors:
        return Committed(set(counts), set(), duplicated, len(ids) - counts.total())
    ok = {i for i, reason in zip(ids, table.column("finish_reason").to_pylist()) if i is not None and reason != "error"}
    return Committed(ok, set(counts) - ok, duplicated, len(ids) - counts.total())


def supersede(store: ResultStore, request_ids: set[str], log: logging.Logger) -> int:
    """Keep one committed row per id of `request_ids`: its newest row that is not an error, else its newest
    error row. Rewrite the shards holding the others without them (a shard left empty is removed); returns
    how many rows were removed."""
    best: dict[str, tuple] = {}
    rows: list[tuple[str, tuple, str, int]] = []    # (request_id, rank, shard path, row index)
    for order, path in enumerate(store.shard_paths()):
        table = read_parquet(store.fs, path, ["request_id", "finish_reason", "completed_at"])
        for i, (rid, reason, at) in enumerate(zip(*(c.to_pylist() for c in table.columns))):
            if rid in request_ids:
                rank = (reason != "error", at.timestamp() if at else 0.0, order, i)
                rows.append((rid, rank, path, i))
                best[rid] = max(best.get(rid, rank), rank)
    drop: dict[str, set[int]] = defaultdict(set)
    for rid, rank, path, i in rows:
        if rank != best[rid]:
            drop[path].add(i)
    for path, indices in drop.items():
        table = read_parquet(store.fs, path)
        kept = table.filter(pa.array([i not in indices for i in range(table.num_rows)]))
        if kept.num_rows:
            publish(store.fs, path, parquet_bytes(kept), join(store.root, "_tmp"))
        else:
            store.fs.rm_file(path)
    removed = sum(len(i) for i in drop.values())
    if removed:
        log.info("superseded %d older rows of retried requests (%d shards rewritten)", removed, len(drop))
    return removed
