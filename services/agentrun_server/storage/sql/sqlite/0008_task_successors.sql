-- A repeated completion is answered as the first was, with the task it made in the next stage:
-- found by this index (a repeat is rare, after a lost ack or a reconnect, but must not scan).
CREATE INDEX tasks_by_previous ON tasks (previous_task_id) WHERE previous_task_id IS NOT NULL;
