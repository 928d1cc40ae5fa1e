"""fsspec helpers: one place that knows how to list, read, publish and exclusively create files on any storage."""
import os
import posixpath
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem


def filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for any fsspec URL; a plain path is local."""
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def visible_files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Files below root, sorted, skipping any file or folder whose name starts with '_' or '.'
    (Spark/Hive convention: run records, temp files, checkpoints)."""
    root = root.rstrip("/")
    fs.invalidate_cache(root)  # another process may have written since we last listed
    found = []
    for path in fs.find(root):
        rel = path[len(root):].lstrip("/")
        if not any(part.startswith(("_", ".")) for part in rel.split("/")):
            found.append(path)
    return sorted(found)


def read_parquet(fs: fsspec.AbstractFileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file read from bytes that Arrow owns.

    Handed a Python file (or Python bytes), Arrow's I/O threads keep Python objects that they release
    later; one released while the interpreter shuts down takes the GIL, the thread is ended with
    pthread_exit inside a C++ destructor, and the process aborts ("terminate called without an active
    exception", exit 134) after it has already said what it had to say."""
    sink = pa.BufferOutputStream()
    sink.write(fs.cat_file(path))
    return pq.read_table(pa.BufferReader(sink.getvalue()), columns=columns)


def parquet_bytes(table: pa.Table) -> bytes:
    """table as a Parquet file, written into Arrow's memory (no Python file for Arrow to hold)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def publish(fs: fsspec.AbstractFileSystem, path: str, data: bytes, tmp_dir: str) -> None:
    """Write data to path so that no reader ever sees a partial file.

    Local disk: write a temp file in tmp_dir (same filesystem), fsync, rename, fsync the folder.
    Object stores: one PUT (or multipart upload) of the final key, which becomes visible whole or not at all.
    The temp name does not end in .parquet, so a `**/*.parquet` glob never picks up a leftover."""
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    os.makedirs(tmp_dir, exist_ok=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(tmp_dir, f"{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dir_fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def probe_writable(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Publish and delete an empty file in root, the way result shards are written; raises OSError when the
    output cannot take a shard (read-only, no permission, a file where the folder should be)."""
    path = join(root, f"_probe-{uuid.uuid4().hex}")   # '_': readers skip it if a crash leaves it behind
    publish(fs, path, b"", join(root, "_runs"))       # the lock's folder: no new folder is left behind
    fs.rm_file(path)


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Create path with data; raise FileExistsError if it already exists.

    Atomic on local disk (hard link), memory, and S3 (If-None-Match: *). Stores that ignore the
    condition degrade to last-writer-wins; callers read the file back to confirm they won."""
    if is_local(fs):
        # write a temp file, then hard-link it into place: link fails if path exists, and a reader
        # never sees the file before its content is complete
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        publish(fs, tmp, data, os.path.dirname(path))
        try:
            os.link(tmp, path)
        finally:
            os.remove(tmp)
        return
    fs.invalidate_cache(path)
    if fs.exists(path):
        raise FileExistsError(path)
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        raise
    except OSError as e:  # s3fs reports a failed If-None-Match as a generic OSError (412)
        if "PreconditionFailed" in str(e) or "412" in str(e):
            raise FileExistsError(path) from e
        raise


def write_bytes(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """A whole file at any fsspec URL, its folder made if need be (for files no reader sees half-written: charts)."""
    fs, path = filesystem(url, storage_options)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)
