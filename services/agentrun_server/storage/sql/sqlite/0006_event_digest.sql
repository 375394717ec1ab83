-- A resent event is a duplicate only if it is the same event (issue 23): each event keeps a
-- digest of its content, compared with whatever arrives later under its sequence number. NULL
-- for events stored before: their digest is computed from their data when needed.
ALTER TABLE agent_run_events ADD COLUMN digest BLOB;
