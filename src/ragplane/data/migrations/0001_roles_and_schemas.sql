-- Roles and schemas. Runs as the owner role, which must have CREATEROLE.
--
-- ragplane_app        LOGIN; not the owner, no superuser, no BYPASSRLS; every
--                     tenant table is read through row-level security.
-- ragplane_reporting  LOGIN; read-only, sees every tenant through its own
--                     SELECT policy (cross-tenant reports), writes nothing.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ragplane_app') THEN
        CREATE ROLE ragplane_app LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT
            NOREPLICATION NOBYPASSRLS;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ragplane_reporting') THEN
        CREATE ROLE ragplane_reporting LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT
            NOREPLICATION NOBYPASSRLS;
    END IF;
END
$$;

-- Nobody but the owner creates objects here.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
DO $$
BEGIN
    EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database());
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO ragplane_app, ragplane_reporting',
                   current_database());
END
$$;
GRANT USAGE ON SCHEMA public TO ragplane_app, ragplane_reporting;

CREATE SCHEMA IF NOT EXISTS control;
GRANT USAGE ON SCHEMA control TO ragplane_app, ragplane_reporting;
GRANT USAGE ON SCHEMA ragplane_meta TO ragplane_app, ragplane_reporting;
GRANT SELECT ON ragplane_meta.schema_migrations TO ragplane_app, ragplane_reporting;
