-- The schema on PostgreSQL: the tables of the SQLite schema (migrations 0001 and 0002 there),
-- with times as epoch seconds (double precision) taken from the database's clock, runs and
-- outputs as bytea, and the ended-task counts spread over shards (see task_counts).

CREATE TABLE collections (
    id          text PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    description text NOT NULL DEFAULT '',
    workflow    text NOT NULL DEFAULT '',
    created_at  double precision NOT NULL,
    run_count   bigint NOT NULL DEFAULT 0
);

CREATE TABLE agent_runs (
    seq           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id            text NOT NULL UNIQUE,
    collection_id text NOT NULL REFERENCES collections (id),
    name          text,
    size_bytes    integer NOT NULL,
    ingested_at   double precision NOT NULL,
    data          bytea NOT NULL
);

CREATE INDEX agent_runs_by_collection ON agent_runs (collection_id, seq);

CREATE TABLE workflows (
    name       text PRIMARY KEY,
    version    integer NOT NULL,
    definition text NOT NULL,
    updated_at double precision NOT NULL
);

CREATE TABLE tasks (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workflow         text NOT NULL,
    stage            text NOT NULL,
    agent_run_id     text NOT NULL,
    collection_id    text NOT NULL,
    state            text NOT NULL,
    priority         integer NOT NULL DEFAULT 0,
    attempt          integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL,
    created_at       double precision NOT NULL,
    ready_at         double precision NOT NULL,
    lease_id         text,
    lease_deadline   double precision,
    session_id       text,
    server_id        text,
    detached_at      double precision,
    pathway          text,
    output           bytea,
    input            bytea,
    previous_task_id bigint,
    finished_at      double precision
);

-- Every claim and settle leaves a dead row version behind, and the partial indexes keep pointing at
-- them until a vacuum: vacuum this table after 2 % of it changed, not the default 20 %, so that the
-- claim and the backlog walk live entries (a queue table's usual setting).
ALTER TABLE tasks SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.02
);

-- The claim reads this index in dispatch order: highest priority first, FIFO within one.
CREATE INDEX tasks_ready ON tasks (workflow, stage, priority DESC, ready_at, id) WHERE state = 'ready';
CREATE INDEX tasks_lease_deadline ON tasks (lease_deadline) WHERE state = 'leased';
CREATE INDEX tasks_session ON tasks (session_id, detached_at) WHERE state = 'leased';
CREATE INDEX tasks_server ON tasks (server_id) WHERE state = 'leased';
CREATE INDEX tasks_by_stage_state ON tasks (workflow, stage, state);
-- At most one ready or leased task per run and workflow (finished_at is NULL exactly then).
CREATE UNIQUE INDEX tasks_one_active_per_run ON tasks (agent_run_id, workflow) WHERE finished_at IS NULL;

CREATE TABLE task_failures (
    task_id   bigint NOT NULL,
    attempt   integer NOT NULL,
    lease_id  text,
    error     text NOT NULL,
    failed_at double precision NOT NULL,
    PRIMARY KEY (task_id, attempt)
);

-- Ended tasks per stage and state, kept as they end. Each transaction adds to the shard of its
-- connection's backend, so replicas completing tasks of one stage at once never wait on one row.
CREATE TABLE task_counts (
    workflow text NOT NULL,
    stage    text NOT NULL,
    state    text NOT NULL,
    shard    integer NOT NULL,
    count    bigint NOT NULL,
    PRIMARY KEY (workflow, stage, state, shard)
);

CREATE TABLE servers (
    id           text PRIMARY KEY,
    host         text NOT NULL,
    pid          integer NOT NULL,
    started_at   double precision NOT NULL,
    heartbeat_at double precision NOT NULL
);

CREATE TABLE lease_revocations (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id    bigint NOT NULL,
    lease_id   text NOT NULL,
    session_id text NOT NULL,
    reason     text NOT NULL,
    created_at double precision NOT NULL
);
CREATE INDEX lease_revocations_by_time ON lease_revocations (created_at);
