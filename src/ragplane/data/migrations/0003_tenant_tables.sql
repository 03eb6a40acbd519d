-- Tenant data. Every table here carries tenant_id, has row-level security
-- enabled AND forced (so the owner is bound too), and one policy for the
-- application role on current_setting('app.tenant_id', true). With no tenant
-- set the setting is NULL or '' and matches no row.

CREATE FUNCTION ragplane_meta.enable_tenant_rls(tbl regclass) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', tbl);
    EXECUTE format('ALTER TABLE %s FORCE ROW LEVEL SECURITY', tbl);
    EXECUTE format(
        'CREATE POLICY tenant_isolation ON %s TO ragplane_app '
        'USING (tenant_id = current_setting(''app.tenant_id'', true)) '
        'WITH CHECK (tenant_id = current_setting(''app.tenant_id'', true))', tbl);
    EXECUTE format(
        'CREATE POLICY reporting_read ON %s FOR SELECT TO ragplane_reporting USING (true)', tbl);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %s TO ragplane_app', tbl);
    EXECUTE format('GRANT SELECT ON %s TO ragplane_reporting', tbl);
END
$$;
REVOKE ALL ON FUNCTION ragplane_meta.enable_tenant_rls(regclass) FROM PUBLIC;

-- Keys are scoped by tenant: primary keys are (tenant_id, id), unique keys start
-- with tenant_id, and children reference parents by (tenant_id, id). A tenant that
-- inserts a row naming another tenant's id or parent gets the same error as for an
-- id that does not exist, so constraint errors reveal nothing across tenants.

CREATE TABLE kb_state (
    tenant_id     text NOT NULL REFERENCES control.tenants (id),
    namespace     text NOT NULL,
    kb_version    bigint NOT NULL DEFAULT 0,   -- bumped by every change; the cache keys on it
    active_model  text NOT NULL,               -- the model queries are answered with
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, namespace)
);

CREATE TABLE documents (
    id            uuid NOT NULL DEFAULT gen_random_uuid(),
    tenant_id     text NOT NULL REFERENCES control.tenants (id),
    namespace     text NOT NULL,
    source_uri    text NOT NULL,
    title         text NOT NULL DEFAULT '',
    media_type    text NOT NULL DEFAULT 'text/plain',
    content_hash  text NOT NULL,
    body          text NOT NULL DEFAULT '',   -- extracted text; chunk offsets index it
    metadata      jsonb NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, namespace, source_uri)
);

-- One row per chunk and embedding model: while a namespace switches models the
-- new model's rows are written beside the old ones, then kb_state.active_model
-- flips and the old rows go, so queries keep working throughout.
CREATE TABLE chunks (
    id               uuid NOT NULL DEFAULT gen_random_uuid(),
    tenant_id        text NOT NULL REFERENCES control.tenants (id),
    document_id      uuid NOT NULL,
    namespace        text NOT NULL,
    embedding_model  text NOT NULL,
    ordinal          integer NOT NULL,
    text             text NOT NULL,
    heading_path     text[] NOT NULL DEFAULT '{}',
    char_start       integer NOT NULL DEFAULT 0,
    char_end         integer NOT NULL DEFAULT 0,
    token_count      integer NOT NULL DEFAULT 0,
    embedding        vector,
    tsv              tsvector NOT NULL DEFAULT ''::tsvector,
    metadata         jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, document_id, embedding_model, ordinal),
    FOREIGN KEY (tenant_id, document_id) REFERENCES documents (tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX chunks_tenant_namespace_idx ON chunks (tenant_id, namespace, embedding_model);
CREATE INDEX chunks_tsv_idx ON chunks USING gin (tsv);
-- one HNSW index per embedding model, on the model's fixed-dimension cast
CREATE INDEX chunks_embedding_all_minilm_l6_v2_idx ON chunks
    USING hnsw ((embedding::vector(384)) vector_cosine_ops)
    WHERE embedding_model = 'all-minilm-l6-v2';

CREATE TABLE chat_sessions (
    id          uuid NOT NULL DEFAULT gen_random_uuid(),
    tenant_id   text NOT NULL REFERENCES control.tenants (id),
    subject     text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);

CREATE TABLE chat_messages (
    id          bigint GENERATED ALWAYS AS IDENTITY,
    tenant_id   text NOT NULL REFERENCES control.tenants (id),
    session_id  uuid NOT NULL,
    role        text NOT NULL CHECK (role IN ('user', 'assistant', 'system', 'tool')),
    content     text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, session_id) REFERENCES chat_sessions (tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX chat_messages_tenant_session_idx ON chat_messages (tenant_id, session_id);

CREATE TABLE request_log (
    request_id  text NOT NULL,
    tenant_id   text NOT NULL REFERENCES control.tenants (id),
    route       text NOT NULL,
    status      integer NOT NULL,
    latency_ms  double precision NOT NULL,
    trace_id    text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, request_id)
);
CREATE INDEX request_log_tenant_created_idx ON request_log (tenant_id, created_at);

SELECT ragplane_meta.enable_tenant_rls(t)
FROM unnest(ARRAY['kb_state', 'documents', 'chunks', 'chat_sessions', 'chat_messages', 'request_log']::regclass[]) AS t;
