-- A collection may enter its live runs into its workflow when they are abandoned, not only when
-- they finish (issue 17). A run enters its workflow once: `entered_at` says it has.
ALTER TABLE collections ADD COLUMN enter_on_abandon boolean NOT NULL DEFAULT false;
ALTER TABLE agent_runs ADD COLUMN entered_at double precision;

-- The sweep for abandoned runs to enter reads only running runs that have not entered.
CREATE INDEX agent_runs_to_enter ON agent_runs (updated_at)
    WHERE state = 'running' AND entered_at IS NULL;
