-- The initial schema. Runs are stored as their encoded agentrun.v1.AgentRun plus the few columns
-- that are queried; tasks keep their lease (the fencing token) after they settle, so a repeated
-- completion can be answered the same way.

CREATE TABLE collections (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    workflow    TEXT NOT NULL DEFAULT '',
    created_at  REAL NOT NULL
);

CREATE TABLE agent_runs (
    seq           INTEGER PRIMARY KEY,
    id            TEXT NOT NULL UNIQUE,
    collection_id TEXT NOT NULL REFERENCES collections (id),
    name          TEXT,
    size_bytes    INTEGER NOT NULL,
    ingested_at   REAL NOT NULL,
    data          BLOB NOT NULL
);

CREATE INDEX agent_runs_by_collection ON agent_runs (collection_id, seq);

CREATE TABLE workflows (
    name       TEXT PRIMARY KEY,
    version    INTEGER NOT NULL,
    definition TEXT NOT NULL,
    updated_at REAL NOT NULL
);

CREATE TABLE tasks (
    id               INTEGER PRIMARY KEY,
    workflow         TEXT NOT NULL,
    stage            TEXT NOT NULL,
    agent_run_id     TEXT NOT NULL,
    collection_id    TEXT NOT NULL,
    state            TEXT NOT NULL,
    priority         INTEGER NOT NULL DEFAULT 0,
    attempt          INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    created_at       REAL NOT NULL,
    ready_at         REAL NOT NULL,
    lease_id         TEXT,
    lease_deadline   REAL,
    session_id       TEXT,
    pathway          TEXT,
    output           BLOB,
    input            BLOB,
    previous_task_id INTEGER,
    finished_at      REAL
);

-- The claim query reads this index in dispatch order: highest priority first, FIFO within one.
CREATE INDEX tasks_ready ON tasks (workflow, stage, priority DESC, ready_at, id) WHERE state = 'ready';
CREATE INDEX tasks_lease_deadline ON tasks (lease_deadline) WHERE state = 'leased';
CREATE INDEX tasks_session ON tasks (session_id) WHERE state = 'leased';
CREATE INDEX tasks_by_stage_state ON tasks (workflow, stage, state);
CREATE INDEX tasks_by_run ON tasks (agent_run_id, workflow);

CREATE TABLE task_failures (
    task_id   INTEGER NOT NULL,
    attempt   INTEGER NOT NULL,
    lease_id  TEXT,
    error     TEXT NOT NULL,
    failed_at REAL NOT NULL,
    PRIMARY KEY (task_id, attempt)
);
