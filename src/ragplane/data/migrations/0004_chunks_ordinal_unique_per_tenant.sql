-- chunks were unique on (document_id, ordinal), a key without tenant_id. A
-- tenant inserting (or updating) a chunk that names another tenant's document
-- id got "duplicate key ... chunks_document_id_ordinal_key" for every ordinal
-- that document has, and a foreign-key violation otherwise: it learned that the
-- document exists and how many chunks it has, despite row-level security.
-- Scoping the key by tenant makes every cross-tenant reference fail the same
-- way (the composite foreign key). Uniqueness is unchanged for valid rows: a
-- document belongs to exactly one tenant.
ALTER TABLE chunks DROP CONSTRAINT chunks_document_id_ordinal_key;
ALTER TABLE chunks ADD CONSTRAINT chunks_tenant_document_ordinal_key
    UNIQUE (tenant_id, document_id, ordinal);
