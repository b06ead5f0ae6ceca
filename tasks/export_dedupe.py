"""Duplicate items of an export: how many the selection holds, and which ones ``export.dedupe`` drops.

Items are taken in sample_id order and an item is a duplicate of an *earlier* one, so the first of each group is
never counted and is the one kept. Two kinds:
- exact: the same images (in order), the same instruction and the same response;
- response: the same response, whatever the images and instruction (every exact duplicate is also one).
Responses are compared after whitespace normalisation (runs of spaces, tabs and line breaks count as one space,
and none at either end). Every comparison is a DuckDB window function over the selection's columns, so the same
SQL runs over the selected rows (the flow) and inside the selection query an export records (`polite sql`); no
text is compared in Python.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

# An export warns when more than this share of its items repeat an earlier item's response: a few repeats are
# natural (short answers), a large share means a model trained on it learns to say the same thing everywhere.
REPEAT_WARN_SHARE = 0.10
# The most repeated responses a dataset card quotes, and how much of each.
TOP_REPEATED = 3
QUOTE_CHARS = 100

_RESPONSE = r"trim(regexp_replace(output, '\s+', ' ', 'g'))"
_GROUP_BY = {"exact": f"image_paths, instruction, {_RESPONSE}", "response": _RESPONSE}
_COLUMNS = ["sample_id", "image_paths", "instruction", "output"]


def rank_sql(kind: str) -> str:
    """The window expression that numbers each group of ``kind`` duplicates by sample_id: 1 is the first."""
    return f"row_number() OVER (PARTITION BY {_GROUP_BY[kind]} ORDER BY sample_id)"


def deduped_selection_sql(sql: str, dedupe: str) -> str:
    """The selection query ``sql`` without ``dedupe``'s duplicates: what an export records, hashes into its id
    and runs in `polite sql`. ``none`` returns ``sql`` unchanged, so an export made without dedupe keeps its id."""
    if dedupe == "none":
        return sql
    return f"SELECT * FROM (\n{sql.strip()}\n) QUALIFY {rank_sql(dedupe)} = 1\nORDER BY sample_id\n"


@dataclass(frozen=True, slots=True)
class Duplicates:
    """The duplicate counts of one export."""

    dedupe: str  # the setting that chose what to drop
    selected: int  # items the selection held, before dedupe
    exact: int  # of those, exact duplicates of an earlier item
    response: int  # of those, items whose response repeats an earlier item's (exact duplicates included)
    dropped: int  # items the setting left out
    exported: int  # items exported
    exported_repeats: int  # exported items whose response repeats an earlier exported item's
    top: tuple[tuple[str, int], ...] = ()  # the most repeated responses (quoted), each with its item count

    def summary(self) -> dict[str, int | str]:
        """Flat fields for a run's summary (the factory keeps a stage's scalars only)."""
        return {
            "dedupe": self.dedupe,
            "n_selected": self.selected,
            "exact_duplicates": self.exact,
            "response_repeats": self.response,
            "dropped_duplicates": self.dropped,
            "exported_response_repeats": self.exported_repeats,
        }

    def as_dict(self) -> dict:
        return asdict(self)


def _counts(con: duckdb.DuckDBPyConnection, relation: str) -> tuple[int, int]:
    """(exact duplicates, response repeats) among the rows of ``relation``."""
    row = con.execute(
        "SELECT count(*) FILTER (WHERE e > 1), count(*) FILTER (WHERE r > 1) "
        f"FROM (SELECT {rank_sql('exact')} AS e, {rank_sql('response')} AS r FROM {relation})"
    ).fetchone()
    return int(row[0]), int(row[1])


def _top_repeated(con: duckdb.DuckDBPyConnection, relation: str) -> tuple[tuple[str, int], ...]:
    rows = con.execute(
        f"SELECT r, n FROM (SELECT {_RESPONSE} AS r, count(*) AS n FROM {relation} GROUP BY r) WHERE n > 1 "
        f"ORDER BY n DESC, r LIMIT {TOP_REPEATED}"
    ).fetchall()
    return tuple((quote(text), int(n)) for text, n in rows)


def quote(text: str | None) -> str:
    """A response as a card or a terminal line shows it: one line, JSON-quoted, at most QUOTE_CHARS long."""
    text = text or ""
    return json.dumps(text if len(text) <= QUOTE_CHARS else text[: QUOTE_CHARS - 1] + "…", ensure_ascii=False)


def drop_duplicates(selection: pa.Table, dedupe: str) -> tuple[pa.Table, Duplicates]:
    """The selection without ``dedupe``'s duplicates (the first of each group by sample_id kept; row order and
    schema as they were), and the counts an export reports.

    The SQL runs in an in-memory DuckDB over the selected rows' Arrow columns (no copy, and the lineage file is
    not held): only the ids of the rows to keep come back.
    """
    con = duckdb.connect()
    try:
        con.register("selection", selection.select(_COLUMNS))
        exact, response = _counts(con, "selection")
        top = _top_repeated(con, "selection")
        kept, exported_repeats = selection, response
        if dedupe != "none":
            ids = con.sql(f"SELECT sample_id FROM selection QUALIFY {rank_sql(dedupe)} = 1").to_arrow_table()
            kept = selection.filter(pc.is_in(selection["sample_id"], value_set=ids["sample_id"]))
            con.register("kept", kept.select(_COLUMNS))
            exported_repeats = _counts(con, "kept")[1]
    finally:
        con.close()
    found = Duplicates(dedupe=dedupe, selected=selection.num_rows, exact=exact, response=response,
                       dropped=selection.num_rows - kept.num_rows, exported=kept.num_rows,
                       exported_repeats=exported_repeats, top=top)  # fmt: skip
    return kept, found


def repeat_warning(found: Duplicates) -> str | None:
    """The warning for an export whose items repeat each other's responses too often (None: they do not)."""
    if not found.exported or found.exported_repeats / found.exported <= REPEAT_WARN_SHARE:
        return None
    share = found.exported_repeats / found.exported
    return (
        f"{found.exported_repeats:,} of {found.exported:,} exported items ({share:.0%}) repeat an earlier item's "
        f"response (export.dedupe: {found.dedupe}); set export.dedupe: response (polite export --dedupe response) "
        "to keep only the first item of each response"
    )
