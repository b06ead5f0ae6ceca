"""Shards: parquet files of up to N records, written atomically and addressed by URL.

A task writes its output to a path derived from its inputs and settings, so a repeated task finds its
output already there and does nothing (see ``exists``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs


def _write_atomic(url: str, write: Callable[[BinaryIO], object]) -> str:
    """Call ``write`` on a temporary sibling of ``url``, then rename it into place; on any failure the
    temporary file is removed, so a failed write leaves nothing behind."""
    fs, path = url_to_fs(url)
    parent, name = path.rsplit("/", 1)
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{name}"
    try:
        with fs.open(tmp, "wb") as handle:
            write(handle)
        fs.mv(tmp, path)
    except BaseException:
        try:
            if fs.exists(tmp):
                fs.rm(tmp)
        except Exception:  # the original error is the one to report
            pass
        raise
    return url


def write_table_atomic(table: pa.Table, url: str) -> str:
    """Write ``table`` to ``url`` via a temporary sibling and a rename; readers never see half a file."""
    return _write_atomic(url, lambda handle: pq.write_table(table, handle, compression="zstd"))


def read_table(url: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle, columns=columns)


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)


def write_bytes_atomic(data: bytes, url: str) -> str:
    """Write ``data`` to ``url`` the way ``write_table_atomic`` writes a table."""
    return _write_atomic(url, lambda handle: handle.write(data))


def chunked(items: Iterable, size: int) -> Iterator[list]:
    """Split any iterable into lists of at most ``size`` (the last may be shorter)."""
    if size <= 0:
        raise ValueError(f"shard size must be positive, got {size}")
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
