-- The cost ledger: one row per caller-visible LLM call (all its attempts), written
-- by the gateway's LedgerSink in batches off the response path.
--
-- The id is minted by the sink when the call is submitted (time-ordered, so inserts
-- land at the right edge of the key), and rows are inserted with ON CONFLICT DO
-- NOTHING: replaying a spill file whose rows were already committed (a crash between
-- the commit and the file's removal) writes nothing twice. created_at is when the
-- call ended, not when the row reached the table.
--
-- Append-only for the application role: it may insert and read its tenant's rows,
-- never change or remove them (retention is an owner job).

CREATE TABLE llm_ledger (
    tenant_id           text NOT NULL REFERENCES control.tenants (id),
    id                  uuid NOT NULL,
    created_at          timestamptz NOT NULL,
    request_id          text NOT NULL,
    trace_id            text,
    feature_id          text,
    alias               text NOT NULL,
    route               text,
    provider            text,
    model               text,
    api                 text NOT NULL,
    stream              boolean NOT NULL,
    status              text NOT NULL,
    http_status         integer NOT NULL,
    attempts            integer NOT NULL CHECK (attempts >= 0),
    input_tokens        bigint NOT NULL DEFAULT 0 CHECK (input_tokens >= 0),
    output_tokens       bigint NOT NULL DEFAULT 0 CHECK (output_tokens >= 0),
    cache_read_tokens   bigint NOT NULL DEFAULT 0 CHECK (cache_read_tokens >= 0),
    cache_write_tokens  bigint NOT NULL DEFAULT 0 CHECK (cache_write_tokens >= 0),
    reasoning_tokens    bigint NOT NULL DEFAULT 0 CHECK (reasoning_tokens >= 0),
    cost_usd            numeric(18, 9) NOT NULL DEFAULT 0,
    latency_ms          double precision NOT NULL,
    ttft_ms             double precision,
    extra               jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(extra) = 'object'),
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX llm_ledger_tenant_created_idx ON llm_ledger (tenant_id, created_at);
CREATE INDEX llm_ledger_tenant_request_idx ON llm_ledger (tenant_id, request_id);

SELECT ragplane_meta.enable_tenant_rls('llm_ledger');
REVOKE UPDATE, DELETE ON llm_ledger FROM ragplane_app;
