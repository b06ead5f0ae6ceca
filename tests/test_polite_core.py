"""Core utilities: the image store, atomic shard writes, stable ids, runtime environment, workspace paths."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from polite.images import BadImageError, ImageStore


def _bmp_claiming(width: int, height: int) -> bytes:
    """A tiny BMP whose header claims ``width`` x ``height``: a few corrupt header bytes, nothing more."""
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "BMP")
    data = bytearray(buf.getvalue())
    data[18:22] = width.to_bytes(4, "little")
    data[22:26] = height.to_bytes(4, "little")
    return bytes(data)


def test_an_image_whose_header_claims_a_huge_size_fails_the_sample_not_the_run(tmp_path):
    store = ImageStore(str(tmp_path / "images"))
    with pytest.raises(BadImageError, match="too large"):
        store.put(_bmp_claiming(30000, 30000))
    assert not (tmp_path / "images").exists()


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_failed_shard_write_leaves_neither_the_shard_nor_a_temporary_file(tmp_path, monkeypatch, where):
    import uuid

    import pyarrow as pa
    from fsspec.core import url_to_fs

    from polite import shards

    root = str(tmp_path / "ws") if where == "local" else f"memory://core-{uuid.uuid4().hex}"
    url = f"{root}/shards/samples/part-0.parquet"

    def half_then_fail(table, handle, **kw):
        handle.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(shards.pq, "write_table", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        shards.write_table_atomic(pa.table({"a": [1]}), url)
    fs, folder = url_to_fs(f"{root}/shards/samples")
    assert fs.ls(folder, detail=False) == []
    assert not shards.exists(url)


def test_a_failed_byte_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    from polite.shards import write_bytes_atomic

    def refuse(self, *args, **kwargs):
        raise PermissionError("read-only destination")

    monkeypatch.setattr(LocalFileSystem, "mv", refuse)
    with pytest.raises(PermissionError, match="read-only destination"):  # the move's own error, unchanged
        write_bytes_atomic(b"image bytes", str(tmp_path / "images" / "ab" / "i_ab.png"))
    assert list((tmp_path / "images" / "ab").iterdir()) == []


def test_runtime_env_keeps_a_lowercase_no_proxy_the_user_set(monkeypatch):
    import os

    from polite.env import configure_runtime_env

    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.setenv("no_proxy", "internal.corp,.svc")
    configure_runtime_env()
    for name in ("NO_PROXY", "no_proxy"):
        hosts = os.environ[name].split(",")
        assert {"internal.corp", ".svc", "127.0.0.1", "localhost"} <= set(hosts), name


def test_runtime_env_merges_both_spellings_of_no_proxy(monkeypatch):
    import os

    from polite.env import configure_runtime_env

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "registry.local")
    configure_runtime_env()
    assert "registry.local" in os.environ["NO_PROXY"].split(",")
    assert "registry.local" in os.environ["no_proxy"].split(",")


def test_two_remote_workspaces_never_share_a_lineage_database(tmp_path, monkeypatch):
    from polite.workspace import Workspace

    monkeypatch.setenv("POLITE_DB_DIR", str(tmp_path / "dbs"))
    a = Workspace.resolve("s3://bucket/team_a").db_path
    b = Workspace.resolve("s3://bucket/team/a").db_path
    assert a != b
    assert a.parent.parent == b.parent.parent == tmp_path / "dbs"
    assert Workspace.resolve("s3://bucket/team_a").db_path == a  # stable


def test_a_remote_database_made_before_the_hashed_name_is_still_found(tmp_path, monkeypatch):
    from polite.workspace import Workspace

    monkeypatch.setenv("POLITE_DB_DIR", str(tmp_path / "dbs"))
    legacy = tmp_path / "dbs" / "s3_bucket_old" / "lineage.duckdb"
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(b"")
    assert Workspace.resolve("s3://bucket/old").db_path == legacy


def test_a_workspace_stores_its_own_paths_relative_and_locates_them_after_a_move(tmp_path):
    """`stored` makes paths inside the root relative (outside ones and URLs elsewhere stay); `locate` and
    `locate_paths` (vectorized, lists too, a sliced table too) read them back against wherever the root is now."""
    import pyarrow as pa

    from polite.workspace import Workspace

    ws = Workspace.resolve(tmp_path / "ws")
    assert ws.stored(f"{ws.root}/images/ab/i_ab.png") == "images/ab/i_ab.png"
    assert ws.stored(f"file://{ws.root}/models/m") == "models/m"
    assert ws.stored(f"{ws.root}/../ws/exports/e") == "exports/e"
    assert ws.stored(f"{ws.root}-other/x") == f"{ws.root}-other/x"  # a sibling whose name starts the same
    assert ws.stored("/elsewhere/model") == "/elsewhere/model"
    remote = Workspace.resolve("s3://bucket/ws")
    assert remote.stored("s3://bucket/ws/images/a.png") == "images/a.png"
    assert remote.stored("s3://bucket/ws2/a.png") == "s3://bucket/ws2/a.png"
    assert remote.locate("images/a.png") == "s3://bucket/ws/images/a.png"

    moved = Workspace.resolve(tmp_path / "moved")
    assert moved.locate(ws.stored(f"{ws.root}/images/ab/i_ab.png")) == f"{moved.root}/images/ab/i_ab.png"
    assert moved.locate("/elsewhere/model") == "/elsewhere/model" and moved.locate(None) is None
    table = pa.table({
        "image_paths": pa.array([["images/a.png", "/abs/b.png", ""], None, [], ["s3://x/y", None]],
                                pa.list_(pa.string())),
        "path": ["images/x", None, "/y", ""],
    })  # fmt: skip
    located = moved.locate_paths(moved.locate_paths(table, "image_paths"), "path")
    assert located.to_pylist() == [
        {"image_paths": [f"{moved.root}/images/a.png", "/abs/b.png", ""], "path": f"{moved.root}/images/x"},
        {"image_paths": None, "path": None},
        {"image_paths": [], "path": "/y"},
        {"image_paths": ["s3://x/y", None], "path": ""},
    ]
    assert moved.locate_paths(table.slice(3, 1), "image_paths").column("image_paths").to_pylist() == [["s3://x/y", None]]


def test_stored_paths_undoes_locate_paths(tmp_path):
    """`stored_paths` (vectorized, lists too) gives back the stored form of located paths; paths outside the
    root, a sibling whose name starts the same included, stay as they are."""
    import pyarrow as pa

    from polite.workspace import Workspace

    ws = Workspace.resolve(tmp_path / "wé s")
    table = pa.table({
        "images": pa.array([["images/a.png", "/abs/b.png", ""], None, [], ["s3://x/y", None]], pa.list_(pa.string())),
        "path": ["images/x", None, f"{ws.root}-other/y", "."],
    })  # fmt: skip
    located = ws.locate_paths(ws.locate_paths(table, "images"), "path")
    assert located.column("images")[0].as_py()[0] == f"{ws.root}/images/a.png"
    assert ws.stored_paths(ws.stored_paths(located, "images"), "path").equals(table)
    assert ws.stored_paths(located.slice(0, 1), "images").column("images").to_pylist() == [
        ["images/a.png", "/abs/b.png", ""]]


def test_an_undecodable_image_s_error_is_the_same_text_every_time():
    """PIL's message names the buffer by its memory address; the stored reason leaves it out."""
    from polite.images import decode_check

    reasons = set()
    for _ in range(3):
        with pytest.raises(BadImageError) as caught:
            decode_check(b"this is not an image")
        reasons.add(str(caught.value))
    assert reasons == {"image cannot be decoded: cannot identify image file"}


def test_a_library_s_value_or_key_error_keeps_its_traceback_ours_is_one_line():
    """The CLI prints a ValueError, KeyError or FileNotFoundError as one line with exit 2 (a user's mistake), but
    only where our code raised it: pyarrow's KeyError on a missing field is a bug, and cron must see exit 1 and
    the traceback, not a config error."""
    import pyarrow as pa

    from polite.cli.common import raised_by_us, user_errors
    from polite.cli.filter import apply_overrides

    @user_errors
    def library_bug():
        pa.table({"a": [1]}).column("kept")

    @user_errors
    def users_mistake():
        apply_overrides({}, ["semantic.threshold"])  # no `=`: our own ValueError

    with pytest.raises(KeyError) as bug:
        library_bug()
    assert not raised_by_us(bug.value)
    with pytest.raises(SystemExit) as stopped:
        users_mistake()
    assert stopped.value.code == 2
