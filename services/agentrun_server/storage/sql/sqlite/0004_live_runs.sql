-- Live runs (issue 17): a run may grow by events until it finishes. A whole-run upload is
-- finished at once (next_sequence 0); a live run's events are kept, one row each, so an append
-- costs the event's size, never the run's; finishing writes the run whole into `data`.
ALTER TABLE agent_runs ADD COLUMN state TEXT NOT NULL DEFAULT 'finished';
ALTER TABLE agent_runs ADD COLUMN next_sequence INTEGER NOT NULL DEFAULT 0;
ALTER TABLE agent_runs ADD COLUMN updated_at REAL;

CREATE TABLE agent_run_events (
    agent_run_id TEXT NOT NULL,
    sequence     INTEGER NOT NULL,
    created_at   REAL NOT NULL,
    data         BLOB NOT NULL,
    PRIMARY KEY (agent_run_id, sequence)
);

CREATE INDEX agent_runs_live ON agent_runs (updated_at) WHERE state = 'running';
