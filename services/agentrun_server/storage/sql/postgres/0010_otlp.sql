-- OpenTelemetry traces (issue 26): each trace is a live run. Its spans are kept once each (by id:
-- exporters retry) with their start times, so that the run is rebuilt in start order when it
-- finishes; `otlp_traces` keeps what the spans have made of the run so far (the assembler's
-- state), whether the root span has ended, and when the last span came: the run finishes once
-- quiet after its root.
CREATE TABLE otlp_spans (
    run_id   text NOT NULL,
    span_id  text NOT NULL,
    start_ns bigint NOT NULL,
    data     bytea NOT NULL,
    PRIMARY KEY (run_id, span_id)
);

CREATE TABLE otlp_traces (
    run_id       text PRIMARY KEY,
    state        bytea,
    root_ended   boolean NOT NULL DEFAULT false,
    last_span_at double precision NOT NULL,
    finished     boolean NOT NULL DEFAULT false
);

CREATE INDEX otlp_traces_to_finish ON otlp_traces (last_span_at)
    WHERE root_ended AND NOT finished;
