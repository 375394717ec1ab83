-- API keys (issue 15): a token's SHA-256 or a client certificate subject, with scopes and the
-- collections and workflows the key is limited to (JSON arrays; empty: not limited). Rows are
-- never deleted: revoking sets revoked_at, so count(*) + count(revoked_at) changes at every
-- change, which is what servers poll to reload their keys.
CREATE TABLE api_keys (
    name         TEXT PRIMARY KEY,
    token_hash   TEXT UNIQUE,
    subject      TEXT,
    scopes       TEXT NOT NULL,
    collections  TEXT NOT NULL DEFAULT '[]',
    workflows    TEXT NOT NULL DEFAULT '[]',
    created_at   REAL NOT NULL,
    revoked_at   REAL,
    last_used_at REAL,
    CHECK ((token_hash IS NULL) != (subject IS NULL))
);
CREATE UNIQUE INDEX api_keys_one_live_subject ON api_keys (subject)
    WHERE subject IS NOT NULL AND revoked_at IS NULL;
