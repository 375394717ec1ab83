-- Who held each lease (issue 27: a task's history names its lease holders). `holder` on a task is
-- the current lease's holder, kept once the task is done; on a failure, the failed attempt's.
-- A JSON array [worker, key, session_id], written once per lease batch.
ALTER TABLE tasks ADD COLUMN holder TEXT;
ALTER TABLE task_failures ADD COLUMN holder TEXT;
