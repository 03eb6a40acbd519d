-- Control-plane changes pushed to the processes that cache them: a change to a
-- tenant's registry row, its namespaces or its API keys sends NOTIFY
-- ragplane_control with the tenant id (control/changes.py), so a suspended tenant
-- or a revoked key stops working at once instead of when a cache entry expires.

CREATE FUNCTION control.notify_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(
        'ragplane_control',
        to_jsonb(CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END) ->> TG_ARGV[0]
    );
    RETURN NULL;
END
$$;

CREATE TRIGGER tenants_changed AFTER UPDATE OR DELETE ON control.tenants
    FOR EACH ROW EXECUTE FUNCTION control.notify_change('id');
CREATE TRIGGER kb_namespaces_changed AFTER INSERT OR UPDATE OR DELETE ON control.kb_namespaces
    FOR EACH ROW EXECUTE FUNCTION control.notify_change('tenant_id');
CREATE TRIGGER api_keys_changed AFTER UPDATE OR DELETE ON control.api_keys
    FOR EACH ROW EXECUTE FUNCTION control.notify_change('tenant_id');
