-- Cleaning up an always-on service (issue 28): a collection keeps its runs `retention_days`
-- after they are stored (0: until deleted), and deleting a run deletes its tasks, the ended ones
-- too, which no index found by run (the unique one holds only ready and leased tasks). A claim or
-- settle never changes agent_run_id, so SQLite never writes this index after the insert.
ALTER TABLE collections ADD COLUMN retention_days INTEGER NOT NULL DEFAULT 0;
CREATE INDEX tasks_by_run ON tasks (agent_run_id);
