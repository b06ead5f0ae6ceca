"""Workspace layout: where the lineage database, images, shards, models, exports and reports live.

The root may be any fsspec URL (shards, images and exports go there); the DuckDB file is always local,
next to the root when the root is local, else under ``POLITE_DB_DIR`` (default ``./.polite``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import fsspec
from fsspec.core import url_to_fs

from polite.ids import stable_hash

DEFAULT_WORKSPACE = "./workspace"


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


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
