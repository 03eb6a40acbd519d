-- Switching a knowledge-base namespace to another embedding model, in the background.
--
-- A switch is a job (an ingest_jobs row of kind 'switch_model') that embeds every
-- document's chunks with the target model into new chunk rows beside the old ones,
-- then, in one transaction, makes the target the model queries are answered with
-- (kb_state.active_model), re-pins the namespace and bumps kb_version; the old
-- model's chunks are deleted afterwards. See ragplane/knowledge/switch.py.

-- The namespace's switch in progress, if any (at most one: the columns are the lock).
ALTER TABLE kb_state
    ADD COLUMN switching_to   text,
    ADD COLUMN switch_job_id  uuid,
    ADD CONSTRAINT kb_state_switch_check CHECK (
        (switching_to IS NULL) = (switch_job_id IS NULL)
        AND (switching_to IS NULL OR switching_to <> active_model)
    );

-- Jobs are of two kinds; a switch names its models and reports its phase
-- (embedding → catching_up → swapping → cleanup → done).
ALTER TABLE ingest_jobs
    ADD COLUMN kind          text NOT NULL DEFAULT 'ingest'
                                 CHECK (kind IN ('ingest', 'switch_model')),
    ADD COLUMN source_model  text,
    ADD COLUMN target_model  text,
    ADD COLUMN phase         text,
    ADD CONSTRAINT ingest_jobs_switch_models_check CHECK (
        (kind = 'switch_model') = (target_model IS NOT NULL AND source_model IS NOT NULL)
    );

-- Dense search filters on one model at a time; each local model has its own partial
-- HNSW index (the expression and operator class of 0003's, so the planner uses it).
CREATE INDEX chunks_embedding_all_minilm_l6_v2_int8_cls_idx ON chunks
    USING hnsw ((embedding::vector(384)) vector_cosine_ops)
    WHERE embedding_model = 'all-minilm-l6-v2-int8-cls';

-- The namespace pin lives in the control plane, which the application role may only
-- read. The swap re-pins the namespace in the same transaction as kb_state, through
-- this function: it changes the pin of the unit of work's own tenant only (the
-- tenant setting that row-level security also reads), and nothing else.
CREATE FUNCTION ragplane_meta.set_namespace_model(ns text, model text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    tenant text := current_setting('app.tenant_id', true);
BEGIN
    IF tenant IS NULL OR tenant = '' THEN
        RAISE EXCEPTION 'set_namespace_model needs a tenant unit of work';
    END IF;
    IF model IS NULL OR model = '' THEN
        RAISE EXCEPTION 'set_namespace_model needs a model';
    END IF;
    UPDATE control.kb_namespaces SET embedding_model = model
    WHERE tenant_id = tenant AND name = ns;
    RETURN FOUND;
END
$$;
REVOKE ALL ON FUNCTION ragplane_meta.set_namespace_model(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ragplane_meta.set_namespace_model(text, text) TO ragplane_app;
