-- A task's run must exist (issue 28): at READ COMMITTED, a task made for a run (enqueued, or the
-- next stage of a completion) while a deletion of that run commits would otherwise outlive it,
-- and no claim could send it. With the foreign key, the one that comes second fails and the
-- engine runs its transaction again, which then sees the other's work. (SQLite runs one writer at
-- a time: no such race there.)
ALTER TABLE tasks ADD CONSTRAINT tasks_run_exists
    FOREIGN KEY (agent_run_id) REFERENCES agent_runs (id) NOT VALID;
ALTER TABLE tasks VALIDATE CONSTRAINT tasks_run_exists;
