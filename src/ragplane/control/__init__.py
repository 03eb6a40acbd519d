"""Control plane: tenant registry, credentials, regions (and, later, feature flags)."""
