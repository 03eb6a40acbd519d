-- Lexical retrieval from an inverted index the application role can use.
--
-- Under row-level security a qual whose operator is not LEAKPROOF is evaluated
-- after the policy's and cannot drive an index scan: `tsv @@ tsquery`
-- (ts_match_vq) and `jsonb ? text` are not leakproof, so the GIN index on
-- chunks.tsv was never used by ragplane_app and every BM25 query scanned (and
-- de-toasted) all of a namespace's chunks. Postings are rows keyed by lexeme:
-- `lexeme = ANY(...)` is text equality, which is leakproof, so a query reads the
-- postings of its own terms through the primary key (an index-only scan: tf and
-- the chunk's length are included). The GIN index and the jsonb term-frequency
-- map it replaces are dropped, which also makes ingestion cheaper.
--
-- Hybrid search also looks for the documents whose *first* chunk (title and
-- opening) is nearest to the query: a partial HNSW index per local model on first
-- chunks only (about a third of the rows) keeps that a plain index scan.
--
-- The statistics triggers keep kb_postings exact with kb_terms, in the same
-- statement. Their delete side now touches only the deleted chunks' lexemes:
-- before, it ended in `DELETE FROM kb_terms WHERE df <= 0`, a scan of the
-- tenant's whole vocabulary per DELETE statement on chunks.

CREATE TABLE kb_postings (
    tenant_id        text NOT NULL REFERENCES control.tenants (id),
    namespace        text NOT NULL,
    embedding_model  text NOT NULL,
    lexeme           text NOT NULL,
    chunk_id         uuid NOT NULL,
    tf               integer NOT NULL,   -- occurrences of the lexeme in the chunk
    dl               integer NOT NULL,   -- the chunk's tsv_length (BM25's document length)
    PRIMARY KEY (tenant_id, namespace, embedding_model, lexeme, chunk_id) INCLUDE (tf, dl)
);

-- backfill as the owner, whom FORCE ROW LEVEL SECURITY would otherwise show no chunk
ALTER TABLE chunks NO FORCE ROW LEVEL SECURITY;
INSERT INTO kb_postings (tenant_id, namespace, embedding_model, lexeme, chunk_id, tf, dl)
SELECT c.tenant_id, c.namespace, c.embedding_model, u.lexeme, c.id,
       coalesce(array_length(u.positions, 1), 1), c.tsv_length
FROM chunks c, unnest(c.tsv) AS u;
ALTER TABLE chunks FORCE ROW LEVEL SECURITY;

SELECT ragplane_meta.enable_tenant_rls('kb_postings');

CREATE INDEX chunks_first_embedding_all_minilm_l6_v2_idx ON chunks
    USING hnsw ((embedding::vector(384)) vector_cosine_ops)
    WHERE embedding_model = 'all-minilm-l6-v2' AND ordinal = 0;
CREATE INDEX chunks_first_embedding_all_minilm_l6_v2_int8_cls_idx ON chunks
    USING hnsw ((embedding::vector(384)) vector_cosine_ops)
    WHERE embedding_model = 'all-minilm-l6-v2-int8-cls' AND ordinal = 0;

DROP INDEX chunks_tsv_idx;
ALTER TABLE chunks DROP COLUMN term_freqs;
DROP FUNCTION ragplane_meta.term_freqs(tsvector);

CREATE OR REPLACE FUNCTION ragplane_meta.kb_terms_add() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO kb_terms AS t (tenant_id, namespace, embedding_model, lexeme, df)
    SELECT n.tenant_id, n.namespace, n.embedding_model, u.lexeme, count(*)
    FROM new_chunks n, unnest(n.tsv) AS u
    GROUP BY 1, 2, 3, 4
    ON CONFLICT (tenant_id, namespace, embedding_model, lexeme)
    DO UPDATE SET df = t.df + EXCLUDED.df;
    INSERT INTO kb_postings (tenant_id, namespace, embedding_model, lexeme, chunk_id, tf, dl)
    SELECT n.tenant_id, n.namespace, n.embedding_model, u.lexeme, n.id,
           coalesce(array_length(u.positions, 1), 1), n.tsv_length
    FROM new_chunks n, unnest(n.tsv) AS u;
    INSERT INTO kb_text_stats AS s (tenant_id, namespace, embedding_model, chunks, tsv_length_total)
    SELECT tenant_id, namespace, embedding_model, count(*), sum(tsv_length)
    FROM new_chunks WHERE tsv <> '' GROUP BY 1, 2, 3
    ON CONFLICT (tenant_id, namespace, embedding_model)
    DO UPDATE SET chunks = s.chunks + EXCLUDED.chunks,
                  tsv_length_total = s.tsv_length_total + EXCLUDED.tsv_length_total;
    RETURN NULL;
END
$$;

-- A term whose last chunks go is deleted, the others are decremented: two disjoint
-- sets of rows, each reached by primary key, so no row is modified twice.
CREATE OR REPLACE FUNCTION ragplane_meta.kb_terms_remove() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    WITH o AS (
        SELECT tenant_id, namespace, embedding_model, u.lexeme, count(*) AS n
        FROM old_chunks, unnest(old_chunks.tsv) AS u
        GROUP BY 1, 2, 3, 4
    ), gone AS (
        DELETE FROM kb_terms AS t USING o
        WHERE t.tenant_id = o.tenant_id AND t.namespace = o.namespace
          AND t.embedding_model = o.embedding_model AND t.lexeme = o.lexeme
          AND t.df <= o.n
    )
    UPDATE kb_terms AS t SET df = t.df - o.n
    FROM o
    WHERE t.tenant_id = o.tenant_id AND t.namespace = o.namespace
      AND t.embedding_model = o.embedding_model AND t.lexeme = o.lexeme
      AND t.df > o.n;
    DELETE FROM kb_postings AS p
    USING old_chunks AS o, unnest(o.tsv) AS u
    WHERE p.tenant_id = o.tenant_id AND p.namespace = o.namespace
      AND p.embedding_model = o.embedding_model AND p.lexeme = u.lexeme AND p.chunk_id = o.id;
    UPDATE kb_text_stats AS s SET chunks = s.chunks - o.n, tsv_length_total = s.tsv_length_total - o.len
    FROM (SELECT tenant_id, namespace, embedding_model, count(*) AS n, sum(tsv_length) AS len
          FROM old_chunks WHERE tsv <> '' GROUP BY 1, 2, 3) AS o
    WHERE s.tenant_id = o.tenant_id AND s.namespace = o.namespace
      AND s.embedding_model = o.embedding_model;
    RETURN NULL;
END
$$;
