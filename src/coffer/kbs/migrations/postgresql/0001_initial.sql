-- Coffer trust-services store, PostgreSQL dialect, schema version 1.
-- Keys use the "C" collation so that ordering and prefix scans follow code points, as in the other stores.

CREATE TABLE coffer_kv (
    namespace   TEXT COLLATE "C" NOT NULL,
    key         TEXT COLLATE "C" NOT NULL,
    value       BYTEA            NOT NULL,
    version     BIGINT           NOT NULL,
    expires_at  TIMESTAMPTZ,
    PRIMARY KEY (namespace, key)
);

CREATE INDEX coffer_kv_expiry ON coffer_kv (namespace, expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE coffer_audit (
    id       BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at       TIMESTAMPTZ NOT NULL,
    action   TEXT        NOT NULL,
    subject  TEXT        NOT NULL,
    outcome  TEXT        NOT NULL,
    detail   TEXT        NOT NULL,
    -- json (not jsonb): kept verbatim, and accepts every string a claim may carry.
    claims   JSON        NOT NULL
);

CREATE INDEX coffer_audit_at ON coffer_audit (at, id);
CREATE INDEX coffer_audit_subject ON coffer_audit (subject, at);
