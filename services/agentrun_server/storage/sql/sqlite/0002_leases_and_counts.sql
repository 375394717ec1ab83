-- Leases that outlive their stream, notices between processes, and counts that do not grow with
-- history.

-- A lease belongs to its lease id. `session_id` is the Work stream holding it now and `server_id`
-- the process serving that stream; a lease whose stream ended without handing it back is
-- detached (session_id NULL, detached_at set) until a worker resumes it or the grace runs out.
ALTER TABLE tasks ADD COLUMN server_id TEXT;
ALTER TABLE tasks ADD COLUMN detached_at REAL;
-- One index finds both a session's leases and the detached ones (session_id NULL) by age; its
-- rows change with every claim and settle anyway, so the second key costs nothing more.
DROP INDEX tasks_session;
CREATE INDEX tasks_session ON tasks (session_id, detached_at) WHERE state = 'leased';

-- Orchestrator processes and their heartbeats: the leases of a process silent past the grace are
-- detached, as if its streams had ended.
CREATE TABLE servers (
    id           TEXT PRIMARY KEY,
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    started_at   REAL NOT NULL,
    heartbeat_at REAL NOT NULL
);

-- Leases taken back from a live stream (cancelled, expired), for the process serving that stream
-- to tell its worker; kept a minute.
CREATE TABLE lease_revocations (
    id         INTEGER PRIMARY KEY,
    task_id    INTEGER NOT NULL,
    lease_id   TEXT NOT NULL,
    session_id TEXT NOT NULL,
    reason     TEXT NOT NULL,
    created_at REAL NOT NULL
);

-- At most one ready or leased task per run and workflow. A task's finished_at is NULL exactly
-- while it is ready or leased; the index keys on that rather than on state, so that a claim
-- (ready -> leased) writes nothing to it (keyed on state, it cost a tenth of the claim path).
-- Earlier releases could break the rule through a redrive; the newer duplicates are cancelled
-- so the index can exist.
UPDATE tasks SET finished_at = NULL WHERE state IN ('ready', 'leased');
UPDATE tasks SET finished_at = coalesce(finished_at, ready_at)
    WHERE state NOT IN ('ready', 'leased');
UPDATE tasks SET state = 'cancelled', finished_at = ready_at, lease_deadline = NULL,
    session_id = NULL
WHERE state IN ('ready', 'leased') AND EXISTS (
    SELECT 1 FROM tasks o
    WHERE o.agent_run_id = tasks.agent_run_id AND o.workflow = tasks.workflow
        AND o.state IN ('ready', 'leased') AND o.id < tasks.id
);
DROP INDEX tasks_by_run;
CREATE UNIQUE INDEX tasks_one_active_per_run ON tasks (agent_run_id, workflow)
    WHERE finished_at IS NULL;

-- Tasks that ended (done, dead, cancelled) per stage, kept as they change state: the backlog
-- counts these here and only ready and leased tasks in the table.
CREATE TABLE task_counts (
    workflow TEXT NOT NULL,
    stage    TEXT NOT NULL,
    state    TEXT NOT NULL,
    count    INTEGER NOT NULL,
    PRIMARY KEY (workflow, stage, state)
) WITHOUT ROWID;
INSERT INTO task_counts (workflow, stage, state, count)
    SELECT workflow, stage, state, COUNT(*) FROM tasks
    WHERE state IN ('done', 'dead', 'cancelled') GROUP BY workflow, stage, state;

-- Runs per collection, kept as runs are stored: a page of runs no longer counts the collection.
ALTER TABLE collections ADD COLUMN run_count INTEGER NOT NULL DEFAULT 0;
UPDATE collections SET run_count = (
    SELECT COUNT(*) FROM agent_runs r WHERE r.collection_id = collections.id
);
