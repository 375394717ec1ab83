-- One index for equality filters on facets, where there were two (by_text, by_num): each facet
-- went into both, though it holds a number or a text, never both. With `num IS NULL` or
-- `text IS NULL` beside the filter's value (the listing's query says it), SQLite reads a page of
-- one key and value in run order from this index alone (measured: a 16 kB run with 4 facets
-- stored in 42-52 us where both indexes took 52-58). PostgreSQL keeps its two: its planner does
-- not read an index in order past an `IS NULL` column, and would sort every match.
DROP INDEX run_facets_by_text;
DROP INDEX run_facets_by_num;
CREATE INDEX run_facets_by_value ON run_facets (collection_id, key, num, text, run_seq);
