-- The lineage contract (DESIGN.md): tables and columns that queries, reports and checks rely on.
-- Add freely in later migrations; never rename. JSON payloads are VARCHAR holding JSON text.

CREATE TABLE IF NOT EXISTS runs (
    run_id              VARCHAR PRIMARY KEY,
    flow                VARCHAR NOT NULL,
    status              VARCHAR NOT NULL,          -- running | completed | failed
    started_at          TIMESTAMP NOT NULL,
    finished_at         TIMESTAMP,
    config              VARCHAR,                   -- JSON of the validated settings
    code_version        VARCHAR,                   -- git SHA when available, else package version
    prefect_flow_run_id VARCHAR,
    parent_run_id       VARCHAR,                   -- the factory run that started this stage run
    summary             VARCHAR                    -- JSON counts written at the end
);

CREATE TABLE IF NOT EXISTS images (
    image_id  VARCHAR PRIMARY KEY,                 -- i_<blake2b of the bytes>
    path      VARCHAR NOT NULL,
    format    VARCHAR,
    width     INTEGER,
    height    INTEGER,
    n_bytes   BIGINT
);

CREATE TABLE IF NOT EXISTS samples (
    sample_id        VARCHAR PRIMARY KEY,          -- s_<hash of source, split, row key, turn>
    source           VARCHAR NOT NULL,
    source_revision  VARCHAR,
    source_key       VARCHAR,
    split            VARCHAR,
    task_type        VARCHAR,
    images           VARCHAR[],                    -- image_ids, in instruction order
    instruction      VARCHAR,
    raw_response     VARCHAR,
    meta             VARCHAR,
    status           VARCHAR NOT NULL,             -- ok | failed
    error            VARCHAR,
    shard            VARCHAR,
    run_id           VARCHAR,
    ingested_at      TIMESTAMP DEFAULT current_timestamp
);

CREATE TABLE IF NOT EXISTS pairs (
    pair_id          VARCHAR PRIMARY KEY,
    sample_id        VARCHAR NOT NULL,             -- the high-quality sample that was degraded
    method           VARCHAR NOT NULL,             -- llm | augment | retrieve
    params           VARCHAR,                      -- JSON: defect, augmentation steps and rates, ...
    seed             BIGINT,
    template_version VARCHAR,
    llm              VARCHAR,                      -- identity of the distorting LLM (method llm)
    instruction      VARCHAR,
    original         VARCHAR,
    distorted        VARCHAR,
    status           VARCHAR NOT NULL,             -- ok | failed
    error            VARCHAR,
    run_id           VARCHAR,
    created_at       TIMESTAMP DEFAULT current_timestamp
);

CREATE TABLE IF NOT EXISTS models (
    model_id        VARCHAR PRIMARY KEY,           -- fingerprint of base weights + adapter + tokenizer
    kind            VARCHAR NOT NULL,              -- rewriter | distorter | scorer
    base            VARCHAR,
    adapter         VARCHAR,
    path            VARCHAR,
    params          VARCHAR,                       -- JSON hyper-parameters
    pairs_query     VARCHAR,                       -- SQL that selected the training pairs
    final_loss      DOUBLE,
    created_by_run  VARCHAR,
    created_at      TIMESTAMP DEFAULT current_timestamp
);

CREATE TABLE IF NOT EXISTS rewrites (
    rewrite_id      VARCHAR PRIMARY KEY,
    sample_id       VARCHAR NOT NULL,
    model_id        VARCHAR NOT NULL,
    prompt_version  VARCHAR,
    settings_hash   VARCHAR NOT NULL,
    settings        VARCHAR,                       -- JSON generation settings actually used
    attempt         INTEGER NOT NULL,
    status          VARCHAR NOT NULL,              -- ok | failed
    output          VARCHAR,
    error           VARCHAR,
    input_tokens    INTEGER,
    output_tokens   INTEGER,
    latency_ms      DOUBLE,
    run_id          VARCHAR,
    reason          VARCHAR,                       -- why this attempt was made (first | retry-failed | rerun: ...)
    created_at      TIMESTAMP DEFAULT current_timestamp
);

CREATE TABLE IF NOT EXISTS scores (
    rewrite_id      VARCHAR NOT NULL,
    scorer          VARCHAR NOT NULL,
    scorer_version  VARCHAR NOT NULL,
    score           DOUBLE,
    passed          BOOLEAN,
    threshold       DOUBLE,
    details         VARCHAR,                       -- JSON: probabilities, paragraph scores, reason
    run_id          VARCHAR,
    created_at      TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (rewrite_id, scorer, scorer_version)
);

CREATE TABLE IF NOT EXISTS decisions (
    decision_id     VARCHAR PRIMARY KEY,
    rewrite_id      VARCHAR NOT NULL,
    kept            BOOLEAN NOT NULL,
    reason          VARCHAR,
    final_output    VARCHAR,                       -- the rewrite after paragraph removal (CLIPScore)
    thresholds      VARCHAR,                       -- JSON thresholds that made this decision
    run_id          VARCHAR,
    decided_at      TIMESTAMP DEFAULT current_timestamp
);

CREATE TABLE IF NOT EXISTS exports (
    export_id       VARCHAR PRIMARY KEY,
    format          VARCHAR NOT NULL,
    path            VARCHAR NOT NULL,
    run_id          VARCHAR,
    selection       VARCHAR,                       -- the SQL that selected the items
    n_items         BIGINT,
    created_at      TIMESTAMP DEFAULT current_timestamp
);

CREATE TABLE IF NOT EXISTS export_items (
    export_id   VARCHAR NOT NULL,
    sample_id   VARCHAR NOT NULL,
    rewrite_id  VARCHAR NOT NULL,
    PRIMARY KEY (export_id, sample_id)
);
