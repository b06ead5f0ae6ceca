"""Workspace layout: where the lineage database, images, shards, models, exports and reports live.

The root may be any fsspec URL (shards, images and exports go there); the DuckDB file is always local,
next to the root when the root is local, else under ``POLITE_DB_DIR`` (default ``./.polite``).

The lineage stores every path inside the workspace relative to its root (``images/ab/i_ab....png``), so a
workspace can be moved or copied whole: `Workspace.stored` makes the stored form, `Workspace.locate` reads it
back. Paths outside the workspace (a model folder passed with ``--model``) stay as given.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import fsspec
from fsspec.core import url_to_fs

from polite.ids import stable_hash

if TYPE_CHECKING:
    import pyarrow as pa

DEFAULT_WORKSPACE = "./workspace"


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def is_absolute(path: str) -> bool:
    """A URL or an absolute local path (as opposed to a path relative to a workspace)."""
    return "://" in path or path.startswith("/")


def _strip_file_scheme(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


@dataclass(frozen=True)
class Workspace:
    root: str

    @classmethod
    def resolve(cls, root: str | os.PathLike | None = None) -> Workspace:
        """``--workspace`` beats ``POLITE_WORKSPACE`` beats ``./workspace``."""
        chosen = str(root) if root is not None else os.environ.get("POLITE_WORKSPACE", DEFAULT_WORKSPACE)
        if is_local(chosen):
            chosen = str(Path(_strip_file_scheme(chosen)).expanduser().resolve())
        return cls(chosen.rstrip("/"))

    @property
    def local(self) -> bool:
        return is_local(self.root)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return url_to_fs(self.root)[0]

    def url(self, *parts: str) -> str:
        return "/".join([self.root, *[p.strip("/") for p in parts if p]])

    def stored(self, path: str | os.PathLike) -> str:
        """How the lineage records ``path``: relative to the root when inside it, else unchanged."""
        text = str(path)
        if self.local:
            text = _strip_file_scheme(text)
            if is_local(text) and os.path.isabs(text):
                # no symlink resolution: a workspace reached through a link stays relative to the link
                rel = os.path.relpath(os.path.normpath(text), self.root)
                return text if rel == ".." or rel.startswith("../") else Path(rel).as_posix()
            return text
        return text[len(self.root) + 1 :] if text.startswith(self.root + "/") else text

    def locate(self, stored: str | None) -> str | None:
        """The path of a stored path: relative ones are under the root; absolute paths and URLs as they are."""
        if not stored or is_absolute(stored):
            return stored
        return self.root if stored == "." else self.url(stored)

    def locate_macro(self) -> str:
        """SQL that defines ``workspace_path(path)``, `locate` in a query (``polite sql`` offers it)."""
        root = "'" + (self.root + "/").replace("'", "''") + "'"
        return (
            "CREATE OR REPLACE TEMP MACRO workspace_path(p) AS CASE WHEN p IS NULL OR p = '' OR starts_with(p, '/') "
            f"OR contains(p, '://') THEN p ELSE {root} || p END"
        )

    def locate_paths(self, table: pa.Table, column: str) -> pa.Table:
        """``table`` with `locate` applied to its ``column`` of paths or of lists of paths (a sample's images),
        vectorized: a rewrite selection has a million of them."""
        import pyarrow.compute as pc

        def locate(values):
            as_is = pc.or_kleene(
                pc.or_kleene(pc.equal(values, ""), pc.starts_with(values, "/")), pc.match_substring(values, "://")
            )
            return pc.if_else(pc.fill_null(as_is, True), values, pc.binary_join_element_wise(self.root + "/", values, ""))

        return _map_paths(table, column, locate)

    def stored_paths(self, table: pa.Table, column: str) -> pa.Table:
        """``table`` with `stored` applied to its ``column`` of paths or of lists of paths as `locate_paths` gives
        them (under ``root/``, not otherwise normalized), vectorized."""
        import pyarrow.compute as pc

        prefix = self.root + "/"
        return _map_paths(
            table,
            column,
            lambda values: pc.if_else(
                pc.fill_null(pc.starts_with(values, prefix), False),
                pc.utf8_slice_codeunits(values, len(prefix)),
                values,
            ),
        )

    @property
    def db_path(self) -> Path:
        if self.local:
            return Path(self.root) / "lineage.duckdb"
        base = Path(os.environ.get("POLITE_DB_DIR", ".polite")).resolve()
        safe = self.root.replace("://", "_").replace("/", "_")
        legacy = base / safe / "lineage.duckdb"
        if legacy.exists():  # made before the folder name carried a hash: keep using it
            return legacy
        # the readable name alone is ambiguous (s3://b/x_y and s3://b/x/y both give s3_b_x_y): add the root's hash
        return base / f"{safe}-{stable_hash('workspace-db', self.root, length=8)}" / "lineage.duckdb"

    @property
    def images(self) -> str:
        return self.url("images")

    def stage_dir(self, stage: str) -> str:
        """Shards of one stage (``samples``, ``pairs``, ``rewrites``, ``scores``, ...)."""
        return self.url("shards", stage)

    @property
    def models(self) -> str:
        return self.url("models")

    @property
    def exports(self) -> str:
        return self.url("exports")

    @property
    def reports(self) -> str:
        return self.url("reports")

    def ensure(self) -> Workspace:
        for d in (self.root, self.images, self.url("shards"), self.models, self.exports, self.reports):
            self.fs.makedirs(d, exist_ok=True)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        return self


def _map_paths(table: pa.Table, column: str, fn) -> pa.Table:
    """``table`` with ``fn`` (string array -> string array) applied to its ``column`` of strings or of lists of
    strings."""
    import pyarrow as pa

    paths = table.column(column).combine_chunks()
    is_list = pa.types.is_list(paths.type) or pa.types.is_large_list(paths.type)
    values = paths.values if is_list else paths  # with .offsets, right for a sliced array too
    mapped = fn(values)
    if is_list:
        mapped = type(paths).from_arrays(paths.offsets, mapped, mask=paths.is_null() if paths.null_count else None)
    return table.set_column(table.schema.get_field_index(column), column, mapped.cast(paths.type))
