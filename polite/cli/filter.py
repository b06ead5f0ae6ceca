"""CLI commands of the filter stage: `polite filter [--rethreshold] [--full-scoring] [--set KEY=VALUE]`."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from polite.cli.common import ConfigOpt, WorkspaceOpt, console, stage_config, user_errors


def _say(message: str) -> None:
    """One line per fact, never wrapped (tests and scripts read these lines whatever the terminal's width)."""
    console.print(message, highlight=False, soft_wrap=True)


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``semantic.threshold=0.5`` sets ``config["filters"]["semantic"]["threshold"]`` (values parsed as YAML)."""
    from polite.cli.factory import apply_overrides as apply_sets

    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(
                f"--set takes KEY=VALUE under `filters.`, e.g. semantic.threshold=0.5; got {item!r}"
            )
    return apply_sets(config, [item if item.startswith("filters.") else f"filters.{item}" for item in overrides])


def register(app: typer.Typer) -> None:
    """Add this stage's commands to `app`."""

    @app.command("filter")
    @user_errors
    def filter_cmd(
        workspace: WorkspaceOpt = None,
        config: ConfigOpt = None,
        rethreshold: Annotated[
            bool,
            typer.Option(
                "--rethreshold", help="Re-decide from stored scores with new thresholds; loads no model."
            ),
        ] = False,
        full_scoring: Annotated[
            bool,
            typer.Option(
                "--full-scoring", help="Score every scorer even after an earlier one dropped a rewrite."
            ),
        ] = False,
        set_: Annotated[
            list[str] | None,
            typer.Option(
                "--set",
                help="Override a filters setting, KEY=VALUE (repeatable), e.g. semantic.threshold=0.5.",
            ),
        ] = None,
        dry_run: Annotated[
            bool,
            typer.Option(
                "--dry-run",
                help="Write nothing: with --rethreshold, what the thresholds would change; else, what would be scored.",
            ),
        ] = False,
    ) -> None:
        """Score the latest rewrites and decide which to keep; resumable (decided rewrites and stored scores stay).

        Scorers in order: rouge, length, unchanged, repetition, truncated, answer, semantic, nli, clipscore, reward.

        Example: polite filter --rethreshold --set semantic.threshold=0.5 --set clipscore.threshold=20 --dry-run
        """
        from flows.filter import filter_flow
        from polite.config import parse_config

        data = stage_config(config).model_dump(mode="json")
        data = apply_overrides(data, set_ or [])
        cfg = parse_config(data, origin=config or "(demo config + --set)")
        if not rethreshold:  # a Hub model the offline hub cannot fetch: before the flow starts, or the dry run ends
            from flows.preflight import check_hub_offline

            check_hub_offline(cfg, ["filter"])
        if dry_run:
            _dry_run(cfg, workspace, rethreshold, full_scoring)
            return
        summary = filter_flow(
            config=data, workspace=workspace, rethreshold=rethreshold, full_scoring=full_scoring
        )
        if "rethreshold" in summary:
            r = summary["rethreshold"]
            _say(f"re-decided {r['decided']} rewrites in {r['seconds']:.3f}s: {r['kept']} kept")
        else:
            _say(
                f"filtered {summary.get('rewrites', 0)} rewrites: {summary.get('kept', 0)} of "
                f"{summary.get('decided', 0)} decided rewrites kept"
            )
            if summary.get("refreshed"):
                _say(_returning_note(summary["refreshed"], **summary["refreshed_kept"]))


def _returning_note(n: int, before: int, after: int, dry: bool = False) -> str:
    """Why a plain filter run changes decisions it does not score: a ``--rethreshold --set`` it undoes."""
    return (
        f"[yellow]{'would re-decide' if dry else 're-decided'} {n} rewrites whose latest decision used other thresholds (a `--rethreshold --set` "
        f"since): the config's thresholds decide them{' again' if not dry else ''}, kept {before} -> {after}. "
        f"To keep other "
        f"thresholds, put them in the config, or pass the same --set to every filter run.[/yellow]"
    )


def _dry_run(cfg, workspace: str | None, rethreshold: bool, full_scoring: bool) -> None:
    """Read-only: the change new thresholds would make (``filters.sql.preview``), or the rewrites a filter run
    would score now."""
    from filters.chain import build_chain
    from filters.sql import preview, returning_sql, work_sql
    from lineage.store import LineageStore
    from polite.workspace import Workspace

    chain = build_chain(cfg.filters)
    store = LineageStore(Workspace.resolve(workspace or cfg.workspace).db_path)
    skipped = ", ".join(s["scorer"] for s in chain.skipped)
    scorers = ", ".join(s.name for s in chain.scorers) + (f" (skipped: {skipped})" if skipped else "")
    if not rethreshold:
        with store.reader() as con:
            n, stored = con.execute(
                f"SELECT count(*), count(prior) FROM ({work_sql(chain, full_scoring)})"
            ).fetchone()
            returning = preview(con, chain, scope=returning_sql(chain))
        shards = -(-n // cfg.filters.shard_size)
        # new thresholds make every rewrite work again, but its stored scores are reused, not recomputed
        reused = f" ({stored} of them with stored scores, reused)" if stored else ""
        _say(f"dry run, filter: {n} rewrites to decide in {shards} shards{reused}; scorers {scorers}")
        if returning["decided"]:
            _say(_returning_note(returning["decided"], returning["kept_now"], returning["kept_new"], dry=True))
        return
    with store.reader() as con:
        change = preview(con, chain)
    if not change["decided"]:
        _say("dry run, rethreshold: no rewrite has been filtered yet; run `polite filter` first")
        return
    delta = change["kept_new"] - change["kept_now"]
    _say(f"dry run, rethreshold (settings {change['settings_hash']}; scorers {scorers}): of "
                  f"{change['decided']} filtered rewrites, kept {change['kept_now']} -> {change['kept_new']} "
                  f"({delta:+d}); nothing written")  # fmt: skip

    def by(counts: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0]))))

    if change["now_kept"]:
        _say(f"  would drop {sum(change['now_kept'].values())} kept now, by: {by(change['now_kept'])}")
    if change["now_dropped"]:
        _say(f"  would keep {sum(change['now_dropped'].values())} dropped now (by: "
                      f"{by(change['now_dropped'])})")  # fmt: skip
    if change["dropped_by"]:
        _say(f"  dropped under these thresholds, by: {by(change['dropped_by'])}")
    for source, (now, new) in sorted(change["by_source"].items()):
        _say(f"  {source}: kept {now} -> {new}")
