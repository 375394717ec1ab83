-- OpenTelemetry traces (issue 26): each trace is a live run. Its spans are kept once each (by id:
-- exporters retry) with their start times, so that the run is rebuilt in start order when it
-- finishes; `otlp_traces` keeps what the spans have made of the run so far (the assembler's
-- state), whether the root span has ended, and when the last span came: the run finishes once
-- quiet after its root.
CREATE TABLE otlp_spans (
    run_id   TEXT NOT NULL,
    span_id  TEXT NOT NULL,
    start_ns INTEGER NOT NULL,
    data     BLOB NOT NULL,
    PRIMARY KEY (run_id, span_id)
);

CREATE TABLE otlp_traces (
    run_id       TEXT PRIMARY KEY,
    state        BLOB,
    root_ended   INTEGER NOT NULL DEFAULT 0,
    last_span_at REAL NOT NULL,
    finished     INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX otlp_traces_to_finish ON otlp_traces (last_span_at)
    WHERE root_ended = 1 AND finished = 0;
