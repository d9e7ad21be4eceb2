-- Coffer trust-services store, SQLite dialect, schema version 1.
-- Times are integer microseconds since the Unix epoch (UTC); NULL expiry means "never".

CREATE TABLE coffer_kv (
    namespace   TEXT    NOT NULL,
    key         TEXT    NOT NULL,
    value       BLOB    NOT NULL,
    version     INTEGER NOT NULL,
    expires_at  INTEGER,
    PRIMARY KEY (namespace, key)
) WITHOUT ROWID;

CREATE INDEX coffer_kv_expiry ON coffer_kv (namespace, expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE coffer_audit (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    at       INTEGER NOT NULL,
    action   TEXT    NOT NULL,
    subject  TEXT    NOT NULL,
    outcome  TEXT    NOT NULL,
    detail   TEXT    NOT NULL,
    claims   TEXT    NOT NULL
);

CREATE INDEX coffer_audit_at ON coffer_audit (at, id);
CREATE INDEX coffer_audit_subject ON coffer_audit (subject, at);
