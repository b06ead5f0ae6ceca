"""The factory report and the dataset card, both read from the lineage (never from a run's memory).

The report (Markdown or HTML, PNG plots by matplotlib) holds the funnel, score histograms of raw annotations
vs rewrites vs kept rewrites, per-source keep rates and sample cards (image, raw annotation, rewrite). It is
also stored as Prefect artifacts (markdown + tables) when a Prefect API is there to take them.
"""

from __future__ import annotations

import html
import io
from typing import Any

import pyarrow as pa

from filters.chain import CHAIN_ORDER  # the funnel lists scorers in the order the chain runs them
from lineage.store import LineageStore
from polite.shards import write_bytes_atomic
from polite.workspace import Workspace

INFO_SCORERS = ("reward_raw", "rouge", "rouge_l")  # recorded for reference; a gate only when set as one


def funnel(store: LineageStore, exporting: int | None = None, note: str = "in this export") -> list[dict[str, Any]]:
    """Counts left after each step: samples, rewritten, each filter in chain order, kept, exported.
    ``exporting``: the items of the export the funnel is shown for (after its dedupe), described by ``note``;
    None: the kept samples that are in an export, for a report of the workspace alone."""
    with store.reader() as con:
        scored = {r[0] for r in con.execute("SELECT DISTINCT scorer FROM scores").fetchall()}
        dropping = {r[0] for r in con.execute("SELECT DISTINCT dropped_by FROM lineage WHERE dropped_by IS NOT NULL").fetchall()}
        # a scorer recorded for reference is a step only where it dropped something (rouge with a min_score)
        scorers = sorted(dropping | {s for s in scored if s not in INFO_SCORERS})
        scorers.sort(key=lambda s: (CHAIN_ORDER.index(s) if s in CHAIN_ORDER else len(CHAIN_ORDER), s))
        n_samples, n_ok, n_rewritten, n_decided, n_kept, n_exported = con.execute(
            "SELECT count(*), count(*) FILTER (WHERE sample_status = 'ok'), "
            "count(*) FILTER (WHERE rewrite_status = 'ok'), count(*) FILTER (WHERE kept IS NOT NULL), "
            "count(*) FILTER (WHERE kept), count(*) FILTER (WHERE kept AND export_id IS NOT NULL) FROM lineage"
        ).fetchall()[0]
        first_fail: dict[int, int] = {}
        if scorers:
            order = ", ".join(f"('{s}', {i})" for i, s in enumerate(scorers))
            # The latest decision names the scorer that dropped each rewrite (`dropped_by`), under today's
            # thresholds; `scores.passed` is only the verdict when the score was computed, so it is read
            # just for decisions older than `dropped_by` (migration 006).
            rows = con.execute(
                f"""WITH o(scorer, idx) AS (VALUES {order})
                SELECT first_fail, count(*) FROM (
                    SELECT CASE WHEN l.kept THEN NULL
                        WHEN l.dropped_by IS NOT NULL THEN (SELECT idx FROM o WHERE o.scorer = l.dropped_by)
                        ELSE (SELECT min(o.idx) FROM scores sc JOIN o USING (scorer)
                              WHERE sc.rewrite_id = l.rewrite_id AND sc.passed = false) END AS first_fail
                    FROM lineage l WHERE l.rewrite_status = 'ok' AND l.kept IS NOT NULL
                ) WHERE first_fail IS NOT NULL GROUP BY first_fail"""
            ).fetchall()
            first_fail = {int(k): int(v) for k, v in rows}
    steps = [
        {"step": "ingested", "count": n_samples, "note": f"{n_samples - n_ok} failed at ingest"},
        {"step": "rewritten", "count": n_rewritten, "note": "latest rewrite ok"},
        {"step": "filtered", "count": n_decided, "note": "have a keep/drop decision"},
    ]
    left = n_decided
    for i, scorer in enumerate(scorers):
        dropped = first_fail.get(i, 0)
        left -= dropped
        steps.append({"step": f"passed {scorer}", "count": left, "note": f"-{dropped}"})
    steps.append({"step": "kept", "count": n_kept, "note": ""})
    if exporting is None:
        steps.append({"step": "exported", "count": n_exported, "note": "in the latest export"})
    else:
        steps.append({"step": "exported", "count": exporting, "note": note})
    return steps


def per_source(store: LineageStore) -> list[dict[str, Any]]:
    with store.reader() as con:
        return (
            con.sql(
                """SELECT source, count(*) AS samples, count(*) FILTER (WHERE rewrite_status = 'ok') AS rewritten,
                   count(*) FILTER (WHERE kept) AS kept,
                   round(count(*) FILTER (WHERE kept) / nullif(count(*) FILTER (WHERE kept IS NOT NULL), 0), 3)
                       AS keep_rate
               FROM lineage GROUP BY source ORDER BY source"""
            )
            .to_arrow_table()
            .to_pylist()
        )


def _score_table(store: LineageStore) -> pa.Table:
    with store.reader() as con:
        return con.sql(
            """SELECT sample_id, source, kept, raw_response, rewrite, coalesce(final_output, rewrite) AS output,
                   reward, raw_reward, semantic, nli, clipscore,
                   length(string_split(trim(raw_response), ' ')) AS raw_words,
                   length(string_split(trim(rewrite), ' ')) AS rewrite_words
               FROM lineage WHERE rewrite_status = 'ok'"""
        ).to_arrow_table()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def plot_funnel(steps: list[dict[str, Any]]) -> bytes:
    """The funnel as horizontal bars, widest at the top (the PNG the README shows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [s["step"] for s in steps]
    counts = [s["count"] for s in steps]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(steps) + 0.8))
    bars = ax.barh(range(len(steps)), counts, color="#d97b3a")
    ax.set_yticks(range(len(steps)), labels)
    ax.invert_yaxis()
    top = max(counts) if counts and max(counts) else 1
    for bar, count in zip(bars, counts, strict=True):
        ax.text(bar.get_width() + top * 0.01, bar.get_y() + bar.get_height() / 2, f"{count:,}", va="center")
    ax.set_xlim(0, top * 1.15)
    ax.set_xlabel("samples")
    ax.set_title("Polite Flamingo funnel")
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def plot_histograms(scores: pa.Table) -> bytes | None:
    """Histograms of raw vs rewritten vs kept, for length and every score that was computed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = scores.to_pylist()
    if not rows:
        return None
    panels = [("words", "raw_words", "rewrite_words")]
    panels += [
        (name, "raw_reward" if name == "reward" else None, name)
        for name in ("reward", "semantic", "nli", "clipscore")
        if any(r[name] is not None for r in rows)
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, raw_col, col) in zip(axes[0], panels, strict=True):
        series = []
        if raw_col:
            series.append(("raw", [r[raw_col] for r in rows if r[raw_col] is not None]))
        series.append(("rewritten", [r[col] for r in rows if r[col] is not None]))
        series.append(("kept", [r[col] for r in rows if r[col] is not None and r["kept"]]))
        values = [v for _, vs in series for v in vs]
        if not values:
            continue
        lo, hi = min(values), max(values)
        bins = 20 if hi > lo else 1
        for label, vs in series:
            if vs:
                ax.hist(
                    vs,
                    bins=bins,
                    range=(lo, hi if hi > lo else lo + 1),
                    alpha=0.5,
                    label=f"{label} ({len(vs)})",
                )
        ax.set_title(title)
        ax.legend(fontsize=8)
    return _png(fig)


def plot_sources(sources: list[dict[str, Any]]) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not sources:
        return None
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(sources) + 2), 3))
    ax.bar([s["source"] for s in sources], [s["keep_rate"] or 0 for s in sources], color="#3a7bd9")
    ax.set_ylim(0, 1)
    ax.set_ylabel("keep rate")
    ax.set_title("keep rate per source")
    ax.tick_params(axis="x", rotation=30)
    return _png(fig)


def _thumbnail(path: str) -> bytes | None:
    from fsspec.core import url_to_fs
    from PIL import Image

    from polite.images import to_rgb

    try:
        fs, local = url_to_fs(path)
        with fs.open(local, "rb") as handle:
            image = to_rgb(Image.open(io.BytesIO(handle.read())))
    except (OSError, ValueError, SyntaxError):  # unreadable image: a card without a picture beats no report
        return None
    image.thumbnail((256, 256))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def sample_cards(store: LineageStore, n: int, exporting: pa.Table | None = None) -> list[dict[str, Any]]:
    """``n`` rewritten samples (before/after): kept ones first, one per distinct raw annotation, taken in turn
    from each source and task type, in a stable order. ``exporting`` (a table with ``sample_id``): the kept
    cards come from the items of that export only (an item its dedupe dropped is not shown as published)."""
    if n <= 0:
        return []
    with store.reader() as con:
        con.register("exporting", exporting.select(["sample_id"]) if exporting is not None else
                     pa.table({"sample_id": pa.array([], pa.string())}))  # fmt: skip
        only_exported = exporting is not None
        return (
            con.sql(
                """WITH candidates AS (
                SELECT l.sample_id, l.source, l.task_type, l.instruction, l.raw_response,
                   coalesce(l.final_output, l.rewrite) AS rewrite, l.reward, l.raw_reward, l.kept, l.decision_reason,
                   (SELECT i.path FROM images i WHERE i.image_id = l.images[1]) AS image_path,
                   coalesce(l.kept, false) AS is_kept, hash(l.sample_id) AS h
                FROM lineage l WHERE l.rewrite_status = 'ok'
                  AND (NOT $only OR NOT coalesce(l.kept, false) OR l.sample_id IN (SELECT sample_id FROM exporting))
                QUALIFY row_number() OVER (PARTITION BY l.raw_response ORDER BY coalesce(l.kept, false) DESC,
                                           hash(l.sample_id)) = 1
            ), ranked AS (
                SELECT *, row_number() OVER (PARTITION BY source, task_type, is_kept ORDER BY h) AS rn FROM candidates
            )
            SELECT sample_id, source, task_type, instruction, raw_response, rewrite, reward, raw_reward, kept,
                   decision_reason, image_path
            FROM ranked ORDER BY is_kept DESC, rn, source, task_type LIMIT $n""",
                params={"n": n, "only": only_exported},
            )
            .to_arrow_table()
            .to_pylist()
        )


def md_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "_(none)_\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append(
            "| " + " | ".join("" if row[c] is None else str(row[c]).replace("|", "\\|") for c in cols) + " |"
        )
    return "\n".join(lines) + "\n"


def _quote(text: str | None) -> str:
    return "\n".join("> " + line for line in (text or "").splitlines() or [""])


def write_report(
    store: LineageStore,
    folder: str,
    fmt: str = "markdown",
    n_cards: int = 6,
    selection: pa.Table | None = None,
    workspace: Workspace | None = None,
) -> str:
    """Write the report (``report.md`` or ``report.html`` + PNGs) into ``folder``; returns its URL. Image paths
    stored relative to ``workspace`` (polite/workspace.py) are read from it."""
    steps = funnel(store, None if selection is None else selection.num_rows)
    sources = per_source(store)
    cards = sample_cards(store, n_cards, selection)
    pictures: dict[str, bytes | None] = {
        "funnel.png": plot_funnel(steps),
        "scores.png": plot_histograms(_score_table(store)),
        "sources.png": plot_sources(sources),
    }
    for i, card in enumerate(cards):
        path = workspace.locate(card["image_path"]) if workspace else card["image_path"]
        thumb = _thumbnail(path) if path else None
        card["picture"] = f"card-{i}.png" if thumb else None
        pictures[f"card-{i}.png"] = thumb
    for name, data in pictures.items():
        if data:
            write_bytes_atomic(data, f"{folder}/{name}")

    md = ["# Polite Flamingo factory report\n", "## Funnel\n", "![funnel](funnel.png)\n", md_table(steps)]
    if pictures["scores.png"]:
        md += ["## Scores: raw vs rewritten vs kept\n", "![scores](scores.png)\n"]
    md += [
        "## Keep rate per source\n",
        "![sources](sources.png)\n" if pictures["sources.png"] else "",
        md_table(sources),
    ]
    md.append("## Sample cards\n")
    for card in cards:
        verdict = "kept" if card["kept"] else (card["decision_reason"] or "dropped")
        md.append(f"### {card['sample_id']} ({card['source']}, {card['task_type']}; {verdict})\n")
        if card["picture"]:
            md.append(f"![image]({card['picture']})\n")
        md.append(f"**Instruction:** {card['instruction']}\n")
        md.append("**Raw annotation:**\n\n" + _quote(card["raw_response"]) + "\n")
        md.append("**Rewrite:**\n\n" + _quote(card["rewrite"]) + "\n")
        if card["reward"] is not None:
            md.append(f"reward {card['reward']:.2f} (raw {card['raw_reward']})\n")
    markdown = "\n".join(md)

    if fmt == "html":
        name, payload = "report.html", _to_html(steps, sources, cards, pictures)
    else:
        name, payload = "report.md", markdown
    url = write_bytes_atomic(payload.encode("utf-8"), f"{folder}/{name}")
    _artifacts(markdown, steps, sources)
    return url


def _to_html(steps, sources, cards, pictures) -> str:
    def table(rows):
        if not rows:
            return "<p>(none)</p>"
        head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
        body = "".join(
            "<tr>"
            + "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in r.values())
            + "</tr>"
            for r in rows
        )
        return f"<table><tr>{head}</tr>{body}</table>"

    parts = [
        "<html><head><meta charset='utf-8'><title>Polite Flamingo report</title></head><body>",
        "<h1>Polite Flamingo factory report</h1><h2>Funnel</h2><img src='funnel.png'>",
        table(steps),
    ]
    if pictures.get("scores.png"):
        parts.append("<h2>Scores: raw vs rewritten vs kept</h2><img src='scores.png'>")
    parts += [
        "<h2>Keep rate per source</h2>",
        "<img src='sources.png'>" if pictures.get("sources.png") else "",
        table(sources),
        "<h2>Sample cards</h2>",
    ]
    for card in cards:
        parts.append(f"<h3>{html.escape(card['sample_id'])} ({html.escape(card['source'])})</h3>")
        if card["picture"]:
            parts.append(f"<img src='{card['picture']}'>")
        for key in ("instruction", "raw_response", "rewrite"):
            parts.append(f"<p><b>{key}:</b> <pre>{html.escape(card[key] or '')}</pre></p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _artifacts(markdown: str, steps, sources) -> None:
    """Mirror the report into Prefect artifacts; outside a flow run skip, and say so if the API refuses."""
    try:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact
        from prefect.context import FlowRunContext

        if FlowRunContext.get() is None:
            return
        create_markdown_artifact(markdown=markdown, key="polite-report", description="Polite Flamingo report")
        create_table_artifact(
            table=steps, key="polite-funnel", description="funnel: samples left after each step"
        )
        create_table_artifact(table=sources, key="polite-keep-rate", description="keep rate per source")
    except Exception as exc:  # an artifact needs the API; the report files are written regardless
        import logging

        logging.getLogger("polite").warning("could not store the report artifacts: %s", exc)
