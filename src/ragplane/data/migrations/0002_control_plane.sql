-- Control plane: the tenant registry and credentials. Not tenant-scoped: the
-- edge reads it before a tenant is known. The application role may only read;
-- writes go through admin commands that connect as the owner.

CREATE TABLE control.tenants (
    id               text PRIMARY KEY CHECK (id ~ '^[a-z][a-z0-9_]{2,62}$'),
    name             text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    home_region      text NOT NULL CHECK (home_region IN ('eu', 'us')),
    data_class       text NOT NULL DEFAULT 'standard'
                         CHECK (data_class IN ('public', 'standard', 'confidential', 'restricted')),
    embedding_model  text NOT NULL DEFAULT 'all-minilm-l6-v2',
    status           text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- A knowledge-base namespace's configuration. Its data-plane state (kb_version,
-- the model its vectors currently use) is tenant data: public.kb_state.
CREATE TABLE control.kb_namespaces (
    tenant_id             text NOT NULL REFERENCES control.tenants (id) ON DELETE CASCADE,
    name                  text NOT NULL CHECK (name ~ '^[a-z0-9][a-z0-9_.-]{0,62}$'),
    embedding_model       text NOT NULL,  -- the pin; a change re-embeds in the background
    chunk_max_tokens      integer NOT NULL DEFAULT 256 CHECK (chunk_max_tokens BETWEEN 16 AND 8192),
    chunk_overlap_tokens  integer NOT NULL DEFAULT 32 CHECK (chunk_overlap_tokens >= 0),
    retrieval             jsonb NOT NULL DEFAULT '{}',  -- fusion method and weights, if not default
    created_at            timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, name),
    CHECK (chunk_overlap_tokens * 2 < chunk_max_tokens)
);

CREATE TABLE control.api_keys (
    id           text PRIMARY KEY,
    tenant_id    text NOT NULL REFERENCES control.tenants (id) ON DELETE CASCADE,
    key_hash     bytea NOT NULL UNIQUE,
    name         text NOT NULL DEFAULT '',
    scopes       text[] NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);
CREATE INDEX api_keys_tenant_idx ON control.api_keys (tenant_id);

GRANT SELECT ON control.tenants, control.kb_namespaces, control.api_keys
    TO ragplane_app, ragplane_reporting;
