-- The RAG request lifecycle (POST /v1/chat): per-tenant guard policy and output
-- mode, feature flags with their audit trail (the global kill switch), the
-- semantic cache, the request log's lifecycle columns and eval samples.

-- Per-tenant policy, read with the tenant's registry row: the input/output guard
-- policy (service/guardrails.py, GuardPolicy.from_mapping) and whether answers
-- stream as they are generated or only once the output guard has passed.
ALTER TABLE control.tenants
    ADD COLUMN guard_policy jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(guard_policy) = 'object'),
    ADD COLUMN output_mode text NOT NULL DEFAULT 'stream' CHECK (output_mode IN ('stream', 'buffered'));

-- Feature flags: on or off, optionally for a share of tenants (by a stable hash of
-- the tenant id) or for listed tenants. Written by the owner (CLI, admin API), read
-- by every process; a change is pushed (NOTIFY ragplane_control 'flag:<name>').
CREATE TABLE control.flags (
    name            text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9-]{1,62}$'),
    enabled         boolean NOT NULL,
    rollout_percent integer NOT NULL DEFAULT 100 CHECK (rollout_percent BETWEEN 0 AND 100),
    tenants         text[] NOT NULL DEFAULT '{}',  -- always on for these (when enabled)
    description     text NOT NULL DEFAULT '',
    updated_at      timestamptz NOT NULL DEFAULT now(),
    updated_by      text NOT NULL DEFAULT ''
);

CREATE TABLE control.flag_audit (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL,
    enabled     boolean,          -- NULL: the flag was deleted
    rollout_percent integer,
    tenants     text[],
    changed_by  text NOT NULL,
    changed_at  timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION control.flag_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    r control.flags;
BEGIN
    IF TG_OP = 'DELETE' THEN
        r := OLD;
        INSERT INTO control.flag_audit (name, changed_by) VALUES (r.name, r.updated_by);
    ELSE
        r := NEW;
        INSERT INTO control.flag_audit (name, enabled, rollout_percent, tenants, changed_by)
        VALUES (r.name, r.enabled, r.rollout_percent, r.tenants, r.updated_by);
    END IF;
    PERFORM pg_notify('ragplane_control', 'flag:' || r.name);
    RETURN NULL;
END
$$;

CREATE TRIGGER flags_changed AFTER INSERT OR UPDATE OR DELETE ON control.flags
    FOR EACH ROW EXECUTE FUNCTION control.flag_changed();

INSERT INTO control.flags (name, enabled, description, updated_by) VALUES
    ('ai-inference-enabled', true,
     'Global kill switch: off stops new LLM inference (cache hits still serve).', 'migration');

GRANT SELECT ON control.flags, control.flag_audit TO ragplane_app, ragplane_reporting;

-- The semantic cache: answers that passed the output guard, keyed by tenant (row-level
-- security) and scope (a hash of model alias, namespace, kb_version, embedding model,
-- prompt version and filters: an answer is reused only where all of those agree).
-- query_key is a hash of the normalised query (the exact-match path); a near miss is
-- found by cosine over the scope's rows and verified by the cache policy and by the
-- evidence its answer cites (service/semcache.py).
CREATE TABLE semantic_cache (
    tenant_id        text NOT NULL REFERENCES control.tenants (id),
    id               uuid NOT NULL DEFAULT gen_random_uuid(),
    scope            text NOT NULL,
    query_key        text NOT NULL,
    query            text NOT NULL,
    embedding_model  text NOT NULL,
    embedding        vector NOT NULL,
    answer           text NOT NULL,
    citations        jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(citations) = 'array'),
    evidence         uuid[] NOT NULL DEFAULT '{}',  -- the chunks the answer cites
    evidence_similarity real NOT NULL DEFAULT 0,   -- the query's cosine to its nearest cited chunk
    model_alias      text NOT NULL,
    namespace        text NOT NULL,
    kb_version       bigint NOT NULL,
    usage            jsonb NOT NULL DEFAULT '{}',
    hits             bigint NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, scope, query_key)
);
CREATE INDEX semantic_cache_scope_idx ON semantic_cache (tenant_id, scope, expires_at);
SELECT ragplane_meta.enable_tenant_rls('semantic_cache');

-- Sessions: the namespace a conversation asks, and when it last moved.
ALTER TABLE chat_sessions
    ADD COLUMN namespace text NOT NULL DEFAULT 'default',
    ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();

-- The request log: one row per /v1/chat request, written in batches off the response
-- path; request_id joins it to the LLM ledger's rows of the same request.
ALTER TABLE request_log
    ADD COLUMN session_id uuid,
    ADD COLUMN namespace text,
    ADD COLUMN model_alias text,
    ADD COLUMN mode text,
    ADD COLUMN cache_hit boolean,
    ADD COLUMN outcome text,  -- answered, blocked, error code
    ADD COLUMN input_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN output_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN cost_usd numeric(18, 9) NOT NULL DEFAULT 0,
    ADD COLUMN spans jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(spans) = 'array'),
    ADD COLUMN counters jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(counters) = 'object');

-- Eval samples: a configurable share of answered requests, kept with their question,
-- answer and cited context for offline evaluation.
CREATE TABLE eval_samples (
    tenant_id   text NOT NULL REFERENCES control.tenants (id),
    request_id  text NOT NULL,
    query       text NOT NULL,
    answer      text NOT NULL,
    contexts    jsonb NOT NULL DEFAULT '[]',
    citations   jsonb NOT NULL DEFAULT '[]',
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, request_id)
);
SELECT ragplane_meta.enable_tenant_rls('eval_samples');
