"""The DuckDB provenance store.

DuckDB locks its file per process: while one process holds it read-write, no other process can open it at
all. So the single writer (the flow process) opens the file only for each short ingest and closes it
again, and every connection, reader or writer, retries with backoff while another process holds the lock.
That lets ``polite sql`` run while a long flow is going; see bench/lineage_concurrency.py for the figures.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from polite.errors import Busy, UserError
from polite.shards import read_table
from polite.workspace import is_local

TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "runs": ("run_id",),
    "images": ("image_id",),
    "samples": ("sample_id",),
    "pairs": ("pair_id",),
    "models": ("model_id",),
    "rewrites": ("rewrite_id",),
    "scores": ("rewrite_id", "scorer", "scorer_version"),
    "decisions": ("decision_id",),
    "decision_settings": ("settings_hash",),
    "exports": ("export_id",),
    "export_items": ("export_id", "sample_id"),
}

# Tables whose key the writer keeps unique itself, without an index (see migrations/007).
UNINDEXED_TABLES = frozenset({"decisions"})


class LineageLockedError(Busy, RuntimeError):
    """Another process held the database for longer than the caller was willing to wait: retry later (exit 75)."""


# How long a connection waits for the file while another process has it (a flow's writer, by default).
LOCK_TIMEOUT_S = 120.0


class LineageNotUpgradedError(UserError, ValueError):
    """The database has migrations this code has not applied yet; a writing command applies them."""


class QueryTimeLimitError(UserError, ValueError):
    """A user query ran past its time limit and was stopped (it would keep running flows from writing)."""


class ReadOnlyQueryError(UserError, ValueError):
    """A user query tried to write, attach, copy, install or read outside the database."""


class NoLineageError(UserError, FileNotFoundError):
    """A stage other than ingest pointed at a folder with no lineage database."""


class PredicateError(UserError, ValueError):
    """A user's SQL predicate (``--where``, ``export.where``, ``train.pairs_where``) that does not parse or bind."""


def _is_lock_error(exc: Exception) -> bool:
    text = str(exc).lower()
    return "lock" in text and ("conflicting" in text or "could not set" in text)


def _migrations() -> list[tuple[int, str, str]]:
    folder = resources.files("lineage") / "migrations"
    found = []
    for entry in folder.iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:3].isdigit():
            found.append((int(name[:3]), name, entry.read_text()))
    return sorted(found)


def _views_sql() -> str:
    return (resources.files("lineage") / "views.sql").read_text()


class LineageStore:
    """Handle on one ``lineage.duckdb`` file. Cheap to create; holds no connection between calls."""

    def __init__(self, db_path: str | Path, lock_timeout_s: float = LOCK_TIMEOUT_S):
        self.db_path = Path(db_path)
        self.lock_timeout_s = lock_timeout_s

    # -- connections -------------------------------------------------------------------------------
    def _connect(self, read_only: bool, timeout_s: float | None, config: dict | None = None):
        wait_s = self.lock_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + wait_s
        delay = 0.005
        while True:
            try:
                con = duckdb.connect(str(self.db_path), read_only=read_only, config=config or {})
            except (duckdb.IOException, duckdb.ConnectionException) as exc:
                if not _is_lock_error(exc) or time.monotonic() >= deadline:
                    if _is_lock_error(exc):
                        raise LineageLockedError(
                            f"{self.db_path} stayed locked by another process for "
                            f"{wait_s:g}s; try again when it finishes"
                        ) from exc
                    raise
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.25)
                continue
            # every stored timestamp in UTC: the column defaults (current_timestamp) follow the session's zone,
            # which is the machine's, while the flows write UTC (runs, decisions)
            con.execute("SET TimeZone = 'UTC'")
            return con

    def require(self) -> None:
        """Stop with ``NoLineageError`` where there is no database yet: only ingest (and ``polite run``) start a
        workspace, so any other stage pointed at the wrong folder says so instead of making an empty one."""
        if not self.db_path.exists():
            raise NoLineageError(
                f"no lineage database at {self.db_path}; run `polite ingest` or `polite run` first, "
                "or point --workspace at an existing workspace"
            )

    @contextmanager
    def writer(self, timeout_s: float | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived read-write connection. Only flow processes use it, never workers."""
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        con = self._connect(read_only=False, timeout_s=timeout_s)
        try:
            yield con
        finally:
            con.close()

    @contextmanager
    def reader(
        self, timeout_s: float | None = None, sandboxed: bool = False
    ) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection; ``sandboxed`` also denies file access (for user-supplied SQL)."""
        self.require()
        config = {"enable_external_access": False} if sandboxed else None
        con = self._connect(read_only=True, timeout_s=timeout_s, config=config)
        try:
            yield con
        finally:
            con.close()

    # -- schema ------------------------------------------------------------------------------------
    def migrate(self) -> list[str]:
        """Apply pending migrations in order, then (re)create the views. Returns the names applied."""
        applied: list[str] = []
        with self.writer() as con:
            con.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, name VARCHAR, applied_at TIMESTAMP DEFAULT current_timestamp)"
            )
            done = {row[0] for row in con.execute("SELECT version FROM schema_migrations").fetchall()}
            for version, name, sql in _migrations():
                if version in done:
                    continue
                con.execute("BEGIN TRANSACTION")
                try:
                    con.execute(sql)
                    con.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (?, ?)", [version, name]
                    )
                    con.execute("COMMIT")
                except Exception:
                    con.execute("ROLLBACK")
                    raise
                applied.append(name)
            con.execute(_views_sql())
        return applied

    @staticmethod
    def pending_migrations(con: duckdb.DuckDBPyConnection) -> list[str]:
        """Migrations this code has that the database has not applied (readers cannot apply them)."""
        try:
            done = {row[0] for row in con.execute("SELECT version FROM schema_migrations").fetchall()}
        except duckdb.CatalogException:
            done = set()
        return [name for version, name, _ in _migrations() if version not in done]

    def not_upgraded(self, con: duckdb.DuckDBPyConnection) -> LineageNotUpgradedError | None:
        """Why a query misses a table or column when the database predates this code's schema (a reader opens it
        read-only and cannot migrate it); None when it is up to date."""
        pending = self.pending_migrations(con)
        if not pending:
            return None
        return LineageNotUpgradedError(
            f"{self.db_path} is not yet upgraded to this version of polite (pending: {', '.join(pending)}); "
            "any command that writes it (polite ingest, polite filter, polite run, ...) applies them first"
        )

    # -- the single writer's bulk paths ------------------------------------------------------------
    def ingest_parquet(
        self,
        table: str,
        urls: str | Sequence[str],
        con: duckdb.DuckDBPyConnection | None = None,
        replace: bool = False,
    ) -> int:
        """Insert the rows of finished shard files into ``table`` with one set-based statement.

        Idempotent on the table's key: rows already present are ignored (or replaced with ``replace``),
        so ingesting the same shard twice changes nothing. Returns the number of rows new to the table.
        """
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            return 0
        if all(is_local(u) for u in urls):
            paths = [u[len("file://") :] if u.startswith("file://") else u for u in urls]
            return self._insert_from(table, _read_parquet_sql(paths), con, replace)
        data = pa.concat_tables([read_table(u) for u in urls], promote_options="default")
        return self.ingest_arrow(table, data, con=con, replace=replace)

    def ingest_arrow(
        self, table: str, data: pa.Table, con: duckdb.DuckDBPyConnection | None = None, replace: bool = False
    ) -> int:
        if data.num_rows == 0:
            return 0
        if con is None:
            with self.writer() as own:
                return self.ingest_arrow(table, data, con=own, replace=replace)
        name = f"_arrow_{table}"
        con.register(name, data)
        try:
            return self._insert_from(table, name, con, replace)
        finally:
            con.unregister(name)

    def _insert_from(self, table: str, source: str, con, replace: bool) -> int:
        if table not in TABLE_KEYS:
            raise ValueError(f"unknown lineage table {table!r}; known: {sorted(TABLE_KEYS)}")
        if con is None:
            with self.writer() as own:
                return self._insert_from(table, source, own, replace)
        columns = [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()]
        src_cols = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()]
        shared = [c for c in columns if c in src_cols]
        keys = TABLE_KEYS[table]
        missing = [k for k in keys if k not in shared]
        if missing:
            raise ValueError(f"shard for {table} lacks key column(s) {missing}; it has {src_cols}")
        cols = ", ".join(shared)
        key_list = ", ".join(keys)
        before = con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
        # Deduplicate within the source too: two rows with one key in a single statement would be an error.
        deduped = f"SELECT *, row_number() OVER (PARTITION BY {key_list}) AS _rn FROM {source}"
        if table in UNINDEXED_TABLES:
            # No index to conflict on: replace = delete the keys first; ignore = insert only new keys.
            match = f"({key_list}) IN (SELECT {key_list} FROM {source})"
            if replace:
                con.execute(f"DELETE FROM {table} WHERE {match}")
                where = "TRUE"
            else:
                where = f"NOT ({key_list}) IN (SELECT {key_list} FROM {table})"
            con.execute(
                f"INSERT INTO {table} ({cols}) SELECT {cols} FROM ({deduped}) WHERE _rn = 1 AND {where}"
            )
        else:
            verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
            con.execute(f"{verb} INTO {table} ({cols}) SELECT {cols} FROM ({deduped}) WHERE _rn = 1")
        after = con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
        return int(after - before)

    def ingest_samples(
        self, urls: Sequence[str], run_id: str, con: duckdb.DuckDBPyConnection
    ) -> list[tuple[str, str, str, bool]]:
        """Insert samples shards; a sample id that several source rows share goes to the first row in source order.

        Rows carry ``source_row`` (their row in the source dataset). Per sample id the winner is the lowest row
        among these shards and a row already stored by this run (``run_id``), so the outcome does not depend on
        which shard finished or was flushed first; a row stored by an earlier run keeps its id. Every losing row
        is stored as its own failed record (id ``s_`` + a hash of the sample id and row, ``duplicate_of`` the id
        it lost, the reason in ``error``); a stored row of this run that loses is turned into one. All
        set-based. Returns ``(source, status, kept_sample_id, stored)`` for each row found to be a duplicate now:
        the status its row was counted under (the caller moves it from that count to ``duplicates``), and whether
        it was a row this run had already stored as a new sample.
        """
        urls = list(urls)
        if not urls:
            return []
        if all(is_local(u) for u in urls):
            paths = [u[len("file://") :] if u.startswith("file://") else u for u in urls]
            return self._ingest_samples_from(_read_parquet_sql(paths), run_id, con)
        data = pa.concat_tables([read_table(u) for u in urls], promote_options="default")
        con.register("_arrow_samples", data)
        try:
            return self._ingest_samples_from("_arrow_samples", run_id, con)
        finally:
            con.unregister("_arrow_samples")

    def _ingest_samples_from(self, source: str, run_id: str, con) -> list[tuple[str, str, str, bool]]:
        src_cols = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()]
        if "source_row" not in src_cols:  # shards written before migration 009: no order to go by
            self._insert_from("samples", source, con, replace=False)
            return []
        columns = [r[0] for r in con.execute("DESCRIBE samples").fetchall()]
        shared = [c for c in columns if c in src_cols and c != "duplicate_of"]
        cols = ", ".join(shared)
        tie = ", shard" if "shard" in src_cols else ""
        # the winning row per sample id (small: ids and rows only)
        con.execute(
            f"""CREATE OR REPLACE TEMP TABLE _first AS
            SELECT c.sample_id, CASE
                WHEN e.source_row IS NULL THEN min(c.source_row)      -- new id, or a row stored before 009
                WHEN e.run_id IS DISTINCT FROM $run THEN e.source_row -- an earlier run's row keeps its id
                ELSE least(e.source_row, min(c.source_row)) END AS first_row
            FROM (SELECT sample_id, source_row FROM {source}) c LEFT JOIN samples e USING (sample_id)
            GROUP BY c.sample_id, e.source_row, e.run_id""",
            {"run": run_id},
        )

        def as_duplicate(alias: str) -> str:
            """The select list that turns a losing row into its own failed record."""
            override = {
                "sample_id": f"'s_' || substr(md5({alias}.sample_id || '#' || {alias}.source_row), 1, 16)",
                "status": "'failed'",
                "error": f"format('duplicate key ''{{}}'': source row {{}} repeats row {{}}, which keeps sample id "
                f"{{}} (the first occurrence of a key wins)', {alias}.source_key, {alias}.source_row, "
                f"f.first_row, {alias}.sample_id)",
            }
            return ", ".join(override.get(c, f"{alias}.{c}") for c in shared) + f", {alias}.sample_id"

        loses = "s.source_row > f.first_row"
        found = con.execute(
            f"SELECT s.source, s.status, s.sample_id, true FROM samples s JOIN _first f USING (sample_id) "
            f"WHERE s.run_id = $run AND {loses} "
            f"UNION ALL SELECT s.source, s.status, s.sample_id, false FROM {source} s JOIN _first f USING (sample_id) "
            f"WHERE {loses}",
            {"run": run_id},
        ).fetchall()
        if found:
            # a row this run stored before an earlier row of its key arrived: record it as the duplicate, then
            # free its id (two statements: DuckDB checks a key deleted and re-inserted in one transaction eagerly)
            con.execute(
                f"INSERT OR IGNORE INTO samples ({cols}, duplicate_of) SELECT {as_duplicate('s')} "
                f"FROM samples s JOIN _first f USING (sample_id) WHERE s.run_id = $run AND {loses}",
                {"run": run_id},
            )
            con.execute(
                f"DELETE FROM samples s USING _first f WHERE s.sample_id = f.sample_id AND s.run_id = $run "
                f"AND {loses}",
                {"run": run_id},
            )
            con.execute(
                f"INSERT OR IGNORE INTO samples ({cols}, duplicate_of) SELECT {as_duplicate('s')} "
                f"FROM {source} s JOIN _first f USING (sample_id) WHERE {loses}"
            )
        con.execute(
            f"""INSERT OR IGNORE INTO samples ({cols})
            SELECT {cols} FROM (
                SELECT s.*, row_number() OVER (PARTITION BY s.sample_id ORDER BY s.source_row{tie}) AS _rn
                FROM {source} s JOIN _first f USING (sample_id) WHERE NOT coalesce({loses}, false)
            ) WHERE _rn = 1"""
        )
        con.execute("DROP TABLE _first")
        return [(src, status, sid, bool(stored)) for src, status, sid, stored in found]

    def replace_failed(
        self, table: str, key: str, urls: Sequence[str], con: duckdb.DuckDBPyConnection,
        same_row: str | None = None,
    ) -> int:
        """Delete rows with status 'failed' whose key comes back with status 'ok' in these shard files.

        The following ``ingest_parquet`` then inserts the good rows: a failure is repaired by re-running on
        fixed input, while rows that were ok stay exactly as they were. With ``same_row`` (a column both sides
        may have, e.g. ``source_row``), only an ok row from the same source row repairs: a later row that
        repeats a failed row's key is its duplicate, not its repair.
        """
        if not urls:
            return 0
        parts = []
        for u in urls:
            wanted = [key, "status"]
            if same_row:
                fs, path = url_to_fs(u)
                with fs.open(path, "rb") as handle:
                    wanted += [same_row] if same_row in pq.read_schema(handle).names else []
            parts.append(read_table(u, columns=wanted))
        data = pa.concat_tables(parts, promote_options="default")
        if data.num_rows == 0:
            return 0
        same = ""
        if same_row and same_row in data.column_names:
            same = (f" AND (r.{same_row} IS NULL OR t.{same_row} IS NULL OR r.{same_row} = t.{same_row})")
        con.register("_repaired", data)
        try:
            deleted = con.execute(
                f"DELETE FROM {table} t WHERE t.status = 'failed' AND EXISTS (SELECT 1 FROM _repaired r "
                f"WHERE r.{key} = t.{key} AND r.status = 'ok'{same}) RETURNING t.{key}"
            ).fetchall()
        finally:
            con.unregister("_repaired")
        return len(deleted)

    # -- reading -----------------------------------------------------------------------------------
    def query(self, sql: str, params: Sequence | None = None, timeout_s: float | None = None) -> pa.Table:
        """Run trusted SQL read-only and return an Arrow table."""
        with self.reader(timeout_s=timeout_s) as con:
            return con.sql(sql, params=params or None).to_arrow_table()

    def user_query(
        self, sql: str, timeout_s: float | None = None, time_limit_s: float | None = None, setup: str | None = None
    ) -> pa.Table:
        """Run user SQL: a single SELECT, read-only, without file or network access. ``setup``: our own SQL run
        first on the same connection (``Workspace.locate_macro``).

        ``time_limit_s``: stop the query after this long (None or 0: no limit). While any connection has the file
        open no flow can write it, and a flow's writer gives up after ``LOCK_TIMEOUT_S``: a query that runs longer
        would fail a running flow."""
        check_read_only_sql(sql)
        with self.reader(timeout_s=timeout_s, sandboxed=True) as con:
            if setup:
                con.execute(setup)
            timer = threading.Timer(time_limit_s, con.interrupt) if time_limit_s else None
            if timer is not None:
                timer.daemon = True
                timer.start()
            try:
                return con.sql(sql).to_arrow_table()
            except duckdb.PermissionException as exc:
                raise ReadOnlyQueryError(
                    f"refused: {exc}. `polite sql` only reads the lineage database."
                ) from exc
            except duckdb.InvalidInputException as exc:
                if "read-only mode" not in str(exc):
                    raise
                # a SELECT whose CTE writes (WITH x AS (DELETE ... RETURNING *) SELECT ...)
                raise ReadOnlyQueryError(
                    "refused: the query writes (an INSERT, UPDATE or DELETE inside it). "
                    "`polite sql` only reads the lineage database."
                ) from None
            except (duckdb.CatalogException, duckdb.BinderException) as exc:
                upgrade = self.not_upgraded(con)
                if upgrade is None:
                    raise
                raise upgrade from exc
            except duckdb.InterruptException:
                raise QueryTimeLimitError(
                    f"the query was stopped after {time_limit_s:g} s: while it reads, no flow can write the lineage, "
                    f"and a flow waits {LOCK_TIMEOUT_S:g} s at most. Narrow it (a WHERE, a LIMIT), or give it "
                    "more time (--time-limit SECONDS, 0 for none) when no flow is running."
                ) from None
            finally:
                if timer is not None:
                    timer.cancel()

    def check_predicate(self, where: str, source: str, option: str) -> None:
        """Raise ``PredicateError`` unless ``where`` runs as a predicate over ``source`` (a table, view or join).

        Binding it with ``LIMIT 0`` reads no rows, so commands check the user's SQL before any work starts; the
        message names the option, the error and the columns it may have meant."""
        if _closes_unopened(where):  # `kept) OR (true`: balanced in our parentheses, but not one predicate
            raise PredicateError(
                f"{option} {where!r} closes a parenthesis it did not open: give one predicate (the command puts "
                "it in parentheses and ANDs it with its own conditions)"
            )
        try:
            # in parentheses: a second statement or a trailing clause (LIMIT, ORDER BY) in it is a syntax error
            self.user_query(f"SELECT 1 FROM {source} WHERE ({where}) LIMIT 0")
        except (duckdb.Error, ReadOnlyQueryError) as exc:
            raise PredicateError(
                f"{option} {where!r} is not a predicate over {source}: {sql_error_summary(exc)}"
                f'. Its columns: polite sql "DESCRIBE SELECT * FROM {source}"'
            ) from None


def _closes_unopened(sql: str) -> bool:
    """Whether ``sql`` closes a parenthesis before opening one (strings and comments aside), which would let a
    predicate escape the parentheses a command wraps it in."""
    depth = 0
    try:
        tokens = duckdb.tokenize(sql)
    except duckdb.Error:  # the parser's own error says what is wrong
        return False
    for pos, kind in tokens:
        if kind == duckdb.token_type.operator and sql[pos] in "()":
            depth += 1 if sql[pos] == "(" else -1
            if depth < 0:
                return True
    return False


def _read_parquet_sql(paths: list[str]) -> str:
    """``read_parquet`` of local files, each path a SQL string literal (Python's repr double-quotes a path with an
    apostrophe: an identifier in SQL, which DuckDB happens to accept as a string there)."""
    files = ", ".join("'" + p.replace("'", "''") + "'" for p in paths)
    return f"read_parquet([{files}], union_by_name = true)"


def sql_error_summary(exc: BaseException) -> str:
    """DuckDB's error in one line: its first line, and the names it suggests (``Candidate ...``) if any."""
    lines = str(exc).splitlines() or [type(exc).__name__]
    hint = next((line for line in lines[1:] if line.startswith("Candidate")), None)
    return lines[0] + (f" ({hint})" if hint else "")


_ALLOWED = {"SELECT", "EXPLAIN"}


def check_read_only_sql(sql: str) -> None:
    """Refuse anything but one SELECT/EXPLAIN statement, with a message that says why."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.ParserException as exc:
        raise ReadOnlyQueryError(f"SQL does not parse: {exc}") from exc
    if len(statements) != 1:
        raise ReadOnlyQueryError(f"give exactly one statement, got {len(statements)}")
    kind = statements[0].type.name
    if kind == "MULTI":  # what DuckDB makes of a PIVOT that must first look up the values it pivots on
        raise ReadOnlyQueryError(
            "this statement runs as several (a PIVOT without an IN list first stores the values it pivots on), "
            "which a read-only database refuses: name the values, e.g. "
            "PIVOT rewrites ON status IN ('ok', 'failed') USING count(*) GROUP BY model_id"
        )
    explained = _explained_kind(statements[0].query) if kind == "EXPLAIN" else "SELECT"
    if kind not in _ALLOWED or explained != "SELECT":
        # the statement's own first word: CHECKPOINT parses as a CALL, which would puzzle its writer
        said = next((t for t in statements[0].query.split() if t.isalpha()), kind).upper()
        what = f"EXPLAIN of a {explained} statement is" if kind == "EXPLAIN" else f"{said} statements are"
        raise ReadOnlyQueryError(
            f"{what} refused: `polite sql` is read-only "
            "(no INSERT/UPDATE/DELETE/CREATE, ATTACH, COPY, INSTALL/LOAD or SET). Use SELECT."
        )


def _explained_kind(query: str) -> str:
    """The type of the statement that ``EXPLAIN [ANALYZE] [(options)] ...`` wraps (EXPLAIN ANALYZE runs it).

    The parser does not say, so: the first suffix of the text, from a token after the EXPLAIN keyword, that
    parses as one statement on its own (``ANALYZE`` and the options do not)."""
    tokens = [pos for pos, kind in duckdb.tokenize(query) if kind != duckdb.token_type.comment]
    for pos in tokens[1:]:
        try:
            inner = duckdb.extract_statements(query[pos:])
        except duckdb.ParserException:
            continue
        if len(inner) == 1:
            return inner[0].type.name
    return "UNKNOWN"
