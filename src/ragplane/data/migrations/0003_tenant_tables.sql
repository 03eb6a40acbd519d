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

-- Term frequencies of a tsvector as {lexeme: occurrences}: BM25 reads the
-- query's few terms from it instead of unnesting every candidate's tsvector.
CREATE FUNCTION ragplane_meta.term_freqs(tsv tsvector) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(jsonb_object_agg(lexeme, coalesce(array_length(positions, 1), 1)), '{}')
    FROM unnest(tsv)
$$;

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
    tsv_length       integer NOT NULL DEFAULT 0,  -- lexeme occurrences: BM25's document length
    term_freqs       jsonb GENERATED ALWAYS AS (ragplane_meta.term_freqs(tsv)) STORED,
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

-- BM25 statistics for the lexical retriever, per (namespace, model) chunk set:
-- how many chunks contain each lexeme, and how many chunks with any lexeme
-- there are and how many lexeme occurrences they hold. Kept exact by statement triggers on chunks, in the
-- same transaction as the change. Delete chunks explicitly before their
-- document: a cascaded delete runs as the table owner, whom RLS on these
-- tables does not let through.
CREATE TABLE kb_terms (
    tenant_id        text NOT NULL REFERENCES control.tenants (id),
    namespace        text NOT NULL,
    embedding_model  text NOT NULL,
    lexeme           text NOT NULL,
    df               bigint NOT NULL,
    PRIMARY KEY (tenant_id, namespace, embedding_model, lexeme)
);

CREATE TABLE kb_text_stats (
    tenant_id        text NOT NULL REFERENCES control.tenants (id),
    namespace        text NOT NULL,
    embedding_model  text NOT NULL,
    chunks           bigint NOT NULL,
    tsv_length_total bigint NOT NULL,
    PRIMARY KEY (tenant_id, namespace, embedding_model)
);

CREATE FUNCTION ragplane_meta.kb_terms_add() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO kb_terms AS t (tenant_id, namespace, embedding_model, lexeme, df)
    SELECT n.tenant_id, n.namespace, n.embedding_model, u.lexeme, count(*)
    FROM new_chunks n, unnest(n.tsv) AS u
    GROUP BY 1, 2, 3, 4
    ON CONFLICT (tenant_id, namespace, embedding_model, lexeme)
    DO UPDATE SET df = t.df + EXCLUDED.df;
    INSERT INTO kb_text_stats AS s (tenant_id, namespace, embedding_model, chunks, tsv_length_total)
    SELECT tenant_id, namespace, embedding_model, count(*), sum(tsv_length)
    FROM new_chunks WHERE tsv <> '' GROUP BY 1, 2, 3
    ON CONFLICT (tenant_id, namespace, embedding_model)
    DO UPDATE SET chunks = s.chunks + EXCLUDED.chunks,
                  tsv_length_total = s.tsv_length_total + EXCLUDED.tsv_length_total;
    RETURN NULL;
END
$$;

CREATE FUNCTION ragplane_meta.kb_terms_remove() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE kb_terms AS t SET df = t.df - o.n
    FROM (SELECT tenant_id, namespace, embedding_model, u.lexeme, count(*) AS n
          FROM old_chunks, unnest(old_chunks.tsv) AS u GROUP BY 1, 2, 3, 4) AS o
    WHERE t.tenant_id = o.tenant_id AND t.namespace = o.namespace
      AND t.embedding_model = o.embedding_model AND t.lexeme = o.lexeme;
    DELETE FROM kb_terms WHERE df <= 0;
    UPDATE kb_text_stats AS s SET chunks = s.chunks - o.n, tsv_length_total = s.tsv_length_total - o.len
    FROM (SELECT tenant_id, namespace, embedding_model, count(*) AS n, sum(tsv_length) AS len
          FROM old_chunks WHERE tsv <> '' GROUP BY 1, 2, 3) AS o
    WHERE s.tenant_id = o.tenant_id AND s.namespace = o.namespace
      AND s.embedding_model = o.embedding_model;
    RETURN NULL;
END
$$;

CREATE TRIGGER chunks_terms_add AFTER INSERT ON chunks
    REFERENCING NEW TABLE AS new_chunks FOR EACH STATEMENT
    EXECUTE FUNCTION ragplane_meta.kb_terms_add();
CREATE TRIGGER chunks_terms_remove AFTER DELETE ON chunks
    REFERENCING OLD TABLE AS old_chunks FOR EACH STATEMENT
    EXECUTE FUNCTION ragplane_meta.kb_terms_remove();

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
FROM unnest(ARRAY['kb_state', 'documents', 'chunks', 'kb_terms', 'kb_text_stats', 'chat_sessions',
             'chat_messages', 'request_log']::regclass[]) AS t;
