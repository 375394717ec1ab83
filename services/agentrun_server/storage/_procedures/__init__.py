"""The storage procedures, written once for every engine.

Each is a coroutine over one transaction's `Statements` (`storage._statements`): it reads, decides
with `storage._rules`, writes through guarded statements, and answers. The engine opens the
transaction around it, commits when it returns and rolls back when it raises; a procedure never
begins, commits or retries. On PostgreSQL a procedure awaits its statements on the event loop; on
SQLite nothing it awaits ever suspends, so the engine runs it to its end in one step on whichever
thread holds the connection (`storage.sqlite._engine.run_to_end`).

- `runs`: collections and runs.
- `live`: live runs' events, finishes and abandoned runs.
- `traces`: OpenTelemetry traces as live runs.
- `workflows`: definitions and the cache that keeps them parsed.
- `tasks`: enqueue, claim, complete, fail, extend, release.
- `leases`: streams that end, workers that resume, heartbeats, the sweep, cancel and redrive.
- `reads`: the backlog and pages of tasks.
- `deletion`: deleting runs and collections, by request and by retention.
- `keys`: API keys.
"""
