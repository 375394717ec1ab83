-- The scores and top-level scalar metadata fields of each run, one row each, so that a listing
-- filtered by them (`scores.reward < 1`, `metadata.model = gpt-4o`) reads an index, not every
-- run's data. A number (or a bool, as 0/1) is in `num`, a string in `text`. Written with the run:
-- at its upload, or when a live run finishes.
CREATE TABLE run_facets (
    run_seq       INTEGER NOT NULL REFERENCES agent_runs (seq) ON DELETE CASCADE,
    collection_id TEXT NOT NULL,
    key           TEXT NOT NULL,
    num           REAL,
    text          TEXT,
    PRIMARY KEY (run_seq, key)
) WITHOUT ROWID;

-- An equality filter reads its matches newest first from one of these, a page at a time.
CREATE INDEX run_facets_by_text ON run_facets (collection_id, key, text, run_seq);
CREATE INDEX run_facets_by_num ON run_facets (collection_id, key, num, run_seq);

-- Runs stored before this migration have no facets yet: the server indexes them in the
-- background, in order, up to `through` (the newest run at migration time).
CREATE TABLE run_facets_backfill (
    done    INTEGER NOT NULL,
    through INTEGER NOT NULL
);
INSERT INTO run_facets_backfill (done, through) SELECT 0, COALESCE(MAX(seq), 0) FROM agent_runs;
