CREATE TABLE IF NOT EXISTS sweeps (
    id            INTEGER PRIMARY KEY,
    name          TEXT NOT NULL,
    profile_path  TEXT NOT NULL,
    profile_toml  TEXT NOT NULL,
    started_at    REAL NOT NULL,
    finished_at   REAL
);
CREATE TABLE IF NOT EXISTS runs (
    id            INTEGER PRIMARY KEY,
    sweep_id      INTEGER NOT NULL REFERENCES sweeps(id),
    spec_id       TEXT NOT NULL,
    repeat        INTEGER NOT NULL,
    grid_index    INTEGER NOT NULL,
    label         TEXT NOT NULL,
    device        TEXT NOT NULL,
    config_json   TEXT NOT NULL,
    argv_json     TEXT NOT NULL,
    status        TEXT NOT NULL,
    cause         TEXT,
    started_at    REAL NOT NULL,
    finished_at   REAL,
    header_json   TEXT,
    worker_summary_json TEXT,
    summary_json  TEXT,
    tokens_per_s  REAL,
    s_per_10k_tokens REAL,
    peak_mem_bytes INTEGER,
    mean_w        REAL,
    j_per_token   REAL,
    final_loss    REAL
);
CREATE INDEX IF NOT EXISTS runs_by_sweep ON runs(sweep_id, spec_id, repeat);
CREATE TABLE IF NOT EXISTS steps (
    run_id        INTEGER NOT NULL REFERENCES runs(id),
    step          INTEGER NOT NULL,
    t             REAL NOT NULL,
    tokens        INTEGER NOT NULL,
    padded_tokens INTEGER,
    target_tokens INTEGER,
    step_seconds  REAL NOT NULL,
    loss          REAL,
    lr            REAL,
    loss_scale    REAL,
    skipped       INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS steps_by_run ON steps(run_id);
CREATE TABLE IF NOT EXISTS telemetry (
    run_id        INTEGER NOT NULL REFERENCES runs(id),
    t             REAL NOT NULL,
    gpu           INTEGER,
    power_w       REAL,
    energy_mj     REAL,
    mem_used_bytes INTEGER,
    proc_mem_bytes INTEGER,
    util_pct      INTEGER,
    sm_clock_mhz  INTEGER,
    temp_c        INTEGER,
    power_limit_w REAL,
    rss_bytes     INTEGER,
    hwm_bytes     INTEGER
);
CREATE INDEX IF NOT EXISTS telemetry_by_run ON telemetry(run_id);
CREATE TABLE IF NOT EXISTS slurm_tasks (
    run_id        INTEGER PRIMARY KEY REFERENCES runs(id),
    array_job     TEXT NOT NULL,
    task          INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sweep_meta (
    sweep_id      INTEGER NOT NULL REFERENCES sweeps(id),
    key           TEXT NOT NULL,
    value         TEXT NOT NULL,
    PRIMARY KEY (sweep_id, key)
);
