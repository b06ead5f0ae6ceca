"""Stage 2: train the rewriter on the distortion stage's pairs and record it in the lineage.

The flow exports the ok pairs as the training set (``flows.distort.write_training_set``), makes the tiny base
model in the workspace when the config asks for it and none exists, trains inside ONE Prefect task (the model
lives in that task's process), then records a ``models`` row keyed by the trained model's fingerprint.

Resume is by folder: the output folder is named by (base fingerprint, training-set content with its image paths
relative to the workspace, settings, seed), so the same inputs continue the same run from its last checkpoint, or
return the finished model at once (a moved or copied workspace finds it too).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from prefect import flow, task

from flows.common import logger, stage_run
from lineage.store import LineageStore
from polite.config import ConfigError, resolve_config
from polite.config.train import TrainSettings
from polite.errors import NoTrainingPairs
from polite.ids import stable_hash
from polite.workspace import Workspace

TINY_BASE = "tiny-base"
# settings that change where and how fast training runs, not what it learns
_RUNTIME_ONLY = ("enabled", "device", "num_threads", "checkpoint_every", "eval_every")


@task(name="train-rewriter")
def train_rewriter_task(
    training_set: str, base: str, out_dir: str, settings: dict, seed: int, base_is_tiny: bool,
    training_digest: str | None = None,
) -> dict:
    """Train (or resume) in ``out_dir``; the model is built, trained and saved in this task's process."""
    from models.train import train_rewriter

    log = logger()
    return train_rewriter(
        training_set, base, out_dir, settings, seed, base_is_tiny, log=log.info, training_digest=training_digest
    )


def ensure_tiny_base(ws: Workspace, training_set: str, seed: int, vocab_size: int) -> str:
    """``<workspace>/models/tiny-base``, made once with a tokenizer trained on the training texts."""
    from models.tiny import make_tiny_rewriter
    from polite.shards import read_table

    folder = Path(ws.models) / TINY_BASE
    if not (folder / "flamingo.json").exists():
        table = read_table(training_set, columns=["prompt", "target"])
        corpus = [
            f"{p}{t}"
            for p, t in zip(
                table.column("prompt").to_pylist(), table.column("target").to_pylist(), strict=True
            )
        ]
        make_tiny_rewriter(folder, seed=seed, corpus=corpus, vocab_size=vocab_size)
    return str(folder)


def portable_training_set(ws: Workspace, training_set: str) -> Path:
    """``training_set`` with its image paths as the lineage stores them (relative to the workspace), in a new
    file under ``models/``: it names the rewriter's folder and is kept there, and is the same wherever the
    workspace is, so a moved or copied workspace finds its rewriter (training reads ``training_set``, whose
    paths say where the images are now)."""
    import tempfile

    from polite.shards import read_table, write_table_atomic

    fd, name = tempfile.mkstemp(prefix=".training_set-", suffix=".parquet", dir=ws.models)
    os.close(fd)
    write_table_atomic(ws.stored_paths(read_table(training_set), "images"), name)
    return Path(name)


def named_by_absolute_paths(ws: Workspace, portable: Path, folder) -> Path | None:
    """The rewriter folder that an earlier version trained on this training set, if there is one.

    Those versions named the folder by the training set as exported (image paths absolute, under the root the
    workspace had then) and kept that very file in it. A candidate must carry the name ``folder`` gives its kept
    file, and that file, with its paths made relative to its own root, must be ``portable``: so a workspace
    trained by such a version and then moved or copied reuses its rewriter instead of training it again."""
    from polite.shards import read_table

    wanted = None
    for kept in sorted(Path(ws.models).glob("rewriter-*/training_set.parquet")):
        if folder(kept) != kept.parent:
            continue  # other inputs (base, settings, seed, pairs), or named by its relative copy already
        table = read_table(kept)
        paths = [p for ps in table.column("images").to_pylist() for p in ps or [] if "/images/" in p]
        if not paths:
            continue
        then = Workspace(paths[0][: paths[0].rindex("/images/")])
        wanted = wanted if wanted is not None else read_table(str(portable)).to_pylist()
        if then.stored_paths(table, "images").to_pylist() == wanted:
            return kept.parent
    return None


def keep_training_set(portable: Path, out_dir: Path) -> str:
    """The portable training set kept beside the model (moved there; dropped if one is there already): the
    export path is reused by later runs, the model's own record of which pairs it saw must not change."""
    kept = out_dir / "training_set.parquet"
    if kept.exists():
        portable.unlink()
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        portable.replace(kept)
    return str(kept)


PAIRS_SOURCE = "pairs p JOIN samples s USING (sample_id)"  # what train.pairs_where may name


def pairs_query(where: str | None) -> str:
    """The SQL that selects the training pairs (as recorded in ``models.pairs_query``)."""
    return (
        f"SELECT p.pair_id FROM {PAIRS_SOURCE} WHERE p.status = 'ok' "
        f"AND p.distorted IS NOT NULL AND coalesce(trim(p.original), '') <> '' AND ({where or 'true'})"
    )


def train_lock(ws: Workspace):
    """Held while a rewriter trains: two trainings in one workspace would resume from each other's checkpoints
    into one model folder (the folder is named by the pairs and settings, which two runs of one config share)
    and register two model ids for one set of weights."""
    from polite.locks import exclusive

    return exclusive(ws.db_path, "train", "a rewriter training")


def check_train_lock(ws: Workspace) -> None:
    """Raise ``WorkspaceBusy`` now if a training is running in ``ws``; take nothing."""
    from polite.locks import probe

    probe(ws.db_path, "train", "a rewriter training")


@flow(name="train_rewriter")
def train_rewriter_flow(
    config: dict | str | None = None,
    workspace: str | None = None,
    parent_run_id: str | None = None,
    base: str | None = None,
    max_steps: int | None = None,
    time_budget_s: float | None = None,
    where: str | None = None,
) -> dict:
    """Train a rewriter; returns model_id, path, final_loss, heldout_loss_start/end and the training figures.

    ``base``/``max_steps``/``time_budget_s``/``where`` override ``train.base``, ``train.max_steps``,
    ``train.time_budget_s`` and ``train.pairs_where``.
    """
    import pyarrow.parquet as pq

    from flows.distort import write_training_set
    from models.loader import as_spec, file_digest, fingerprint

    cfg = resolve_config(config)
    overrides = {"base": base, "max_steps": max_steps, "time_budget_s": time_budget_s, "pairs_where": where}
    try:
        settings = TrainSettings.model_validate(
            {**cfg.train.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
        )
    except ValueError as exc:
        raise ConfigError(f"invalid train settings: {exc}") from None
    ws = Workspace.resolve(workspace or cfg.workspace)
    if not ws.local:
        raise ConfigError(
            f"training reads and writes models on local disk; {ws.root} is not a local workspace"
        )
    if settings.pairs_where:
        LineageStore(ws.db_path).check_predicate(settings.pairs_where, PAIRS_SOURCE, "train.pairs_where (--where)")
    is_tiny = settings.base == "tiny"
    if not is_tiny:
        as_spec(settings.base)  # a wrong base path fails here, before any work
    data = cfg.model_dump(mode="json")
    data["train"] = settings.model_dump(mode="json")
    log = logger()
    with train_lock(ws), stage_run("train_rewriter", data, ws, parent_run_id) as run:
        training_set = write_training_set(data, ws.root, where=settings.pairs_where)
        n_pairs = pq.ParquetFile(training_set).metadata.num_rows
        if n_pairs == 0:
            raise NoTrainingPairs(
                "no ok pairs to train on (check train.pairs_where, or run `polite distort` first)"
            )
        base_path = (
            ensure_tiny_base(ws, training_set, cfg.seed, settings.tiny_vocab_size)
            if is_tiny
            else settings.base
        )
        base_fp = fingerprint(as_spec(base_path))
        learned = {k: v for k, v in settings.model_dump(mode="json").items() if k not in _RUNTIME_ONLY}
        portable = portable_training_set(ws, training_set)

        def folder(training: str | Path) -> Path:
            tag = stable_hash("rewriter", base_fp, file_digest(training), learned, cfg.seed, length=12)
            return Path(ws.models) / f"rewriter-{tag}"

        out_dir = folder(portable)
        if not out_dir.exists():  # or one named by a version that hashed the image paths as they were then
            out_dir = named_by_absolute_paths(ws, portable, folder) or out_dir
        kept = keep_training_set(portable, out_dir)
        log.info("training the rewriter on %d pairs from %s into %s", n_pairs, base_path, out_dir)
        summary = train_rewriter_task.submit(
            training_set, base_path, str(out_dir), settings.model_dump(mode="json"), cfg.seed, is_tiny,
            file_digest(kept),  # resume by the workspace-relative content: a moved workspace resumes too
        ).result()
        spec = as_spec(out_dir)
        model_id = fingerprint(spec)
        params = {**learned, "seed": cfg.seed, **{k: summary.get(k) for k in ("n_train", "n_heldout", "train_groups",
                  "n_trainable", "train_seconds", "steps_per_s", "device", "precision")}}  # fmt: skip
        with run.store.writer() as con:
            con.execute(
                "INSERT OR IGNORE INTO models (model_id, kind, base, adapter, path, params, pairs_query, final_loss, "
                "created_by_run, heldout_loss_start, heldout_loss_end, n_pairs, training_set, steps) "
                "VALUES (?, 'rewriter', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [model_id, base_fp, spec.adapter, ws.stored(out_dir), json.dumps(params, sort_keys=True),
                 pairs_query(settings.pairs_where), summary["final_loss"], run.run_id, summary["heldout_loss_start"],
                 summary["heldout_loss_end"], n_pairs, ws.stored(kept), summary["steps"]],
            )  # fmt: skip
        result: dict[str, Any] = {
            "model_id": model_id,
            "path": str(out_dir),
            "base": base_fp,
            "training_set": kept,
            "n_pairs": n_pairs,
            **{
                k: summary.get(k)
                for k in (
                    "final_loss",
                    "heldout_loss_start",
                    "heldout_loss_end",
                    "steps",
                    "steps_per_s",
                    "train_seconds",
                    "resumed_from",
                )
            },  # fmt: skip
        }
        run.summary.update(result)
    return result
