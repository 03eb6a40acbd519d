"""``ragplane up`` end to end: the real executable, its embedded Postgres, real HTTP.

Each test starts ``.venv/bin/ragplane up`` in a subprocess on a free loopback port with
its own data directory, waits (bounded) for the readiness banner, talks to it with
httpx, and stops it with SIGTERM the way a supervisor or Ctrl-C would.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import jwt
import pytest

from ragplane.data import migrate

RAGPLANE = Path(sys.executable).with_name("ragplane")
READY_BANNER = "ragplane is ready"
READY_WAIT_S = 90.0
STOP_WAIT_S = 30.0
ALL_INTERFACES = "0.0.0.0"  # noqa: S104

pytestmark = pytest.mark.timeout(300)


def _env() -> dict[str, str]:
    """The caller's environment without ragplane settings (no DATABASE_URL: embedded mode)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("RAGPLANE_") and k not in ("DATABASE_URL", "FORCE_COLOR")
    }
    env.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())  # as `make up` sets it
    env["NO_COLOR"] = "1"
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (an unreaped zombie holds no resources)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _postmaster_pid(data_dir: Path) -> int | None:
    pidfile = data_dir / "pg" / "postmaster.pid"
    try:
        first = pidfile.read_text().splitlines()[0]
    except (FileNotFoundError, IndexError):
        return None
    return int(first)


def _wait_until(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@dataclass
class Up:
    """One running ``ragplane up`` process."""

    proc: subprocess.Popen[bytes]
    log: Path
    data_dir: Path
    port: int
    started: float
    ready_after_s: float | None = None
    postmaster: int | None = field(default=None)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self) -> str:
        """Wait for the banner and the demo token; return the token (last line with 'eyJ')."""
        deadline = time.monotonic() + READY_WAIT_S
        while time.monotonic() < deadline:
            text = self.output()
            tokens = [ln.strip() for ln in text.splitlines() if ln.startswith("eyJ")]
            if READY_BANNER in text and tokens:
                self.ready_after_s = time.monotonic() - self.started
                self.postmaster = _postmaster_pid(self.data_dir)
                return tokens[-1]
            if self.proc.poll() is not None:
                pytest.fail(f"ragplane up exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.1)
        pytest.fail(f"ragplane up not ready within {READY_WAIT_S:g}s:\n{self.output()}")

    def terminate(self) -> int:
        """SIGTERM, then the exit status (bounded wait)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"ragplane up did not exit within {STOP_WAIT_S:g}s of SIGTERM")


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A data directory outside pytest's temporary root.

    Run as root, the embedded Postgres runs as an unprivileged user and needs the parent
    directories to be traversable (pgserver opens them up when it starts). Every pytest
    session that starts meanwhile resets ``/tmp/pytest-of-<user>`` to mode 0700, which would
    take the running server's data directory away from it.
    """
    path = Path(tempfile.mkdtemp(prefix="ragplane-e2e-"))
    try:
        yield path / "data"
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_up(tmp_path: Path) -> Iterator[Callable[[Path], Up]]:
    started: list[Up] = []

    def start(data_dir: Path) -> Up:
        port = _free_port()
        log = tmp_path / f"up-{len(started)}.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                [str(RAGPLANE), "up", "--port", str(port), "--data-dir", str(data_dir)],
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=_env(),
            )
        up = Up(proc=proc, log=log, data_dir=data_dir, port=port, started=time.monotonic())
        started.append(up)
        return up

    yield start

    for up in started:  # whatever the test did, leave no process behind
        if up.proc.poll() is None:
            up.proc.send_signal(signal.SIGTERM)
            try:
                up.proc.wait(timeout=STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                up.proc.kill()
                up.proc.wait(timeout=STOP_WAIT_S)
        pid = _postmaster_pid(up.data_dir)
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGQUIT)  # immediate shutdown of a leaked postmaster


def ragplane(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(RAGPLANE), *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def whoami(up: Up, token: str) -> httpx.Response:
    return httpx.get(
        f"{up.base_url}/v1/whoami", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )


def test_up_serves_over_http_and_stops_cleanly(
    start_up: Callable[[Path], Up], data_dir: Path
) -> None:
    up = start_up(data_dir)
    token = up.wait_ready()
    print(f"\nragplane up (fresh data dir) ready after {up.ready_after_s:.1f} s")
    out = up.output()
    assert f"{READY_BANNER} at {up.base_url}" in out
    assert f"data directory: {data_dir}" in out
    assert "Traceback" not in out

    ready = httpx.get(f"{up.base_url}/ready", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"status": "ready", "schema_version": migrate.available()[-1].version}

    r = whoami(up, token)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tenant_id"] == "tnt_acme_eu"
    assert body["region"] == "eu"
    assert body["auth_method"] == "jwt"
    assert body["request_id"] == r.headers["x-request-id"]

    # a token that is not signed by this data directory's dev key is refused
    tampered = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert whoami(up, tampered).status_code == 401

    # one process: an upload is ingested by the worker that runs beside the API
    auth = {"Authorization": f"Bearer {token}"}
    r = httpx.post(
        f"{up.base_url}/v1/documents",
        headers=auth,
        files={"file": ("hello.md", b"# Hello\n\nHello from the laptop.\n", "text/markdown")},
        timeout=10,
    )
    assert r.status_code == 202, r.text
    status_url = f"{up.base_url}{r.json()['status_url']}"
    assert _wait_until(
        lambda: httpx.get(status_url, headers=auth, timeout=10).json()["status"] == "succeeded",
        60,
    ), (httpx.get(status_url, headers=auth, timeout=10).text, up.output())

    postmaster = up.postmaster
    assert postmaster is not None, "no postmaster.pid in the data directory while running"
    assert _alive(postmaster)

    assert up.terminate() == 0, up.output()
    assert _wait_until(lambda: not _alive(postmaster), 10), (
        f"embedded postgres (pid {postmaster}) still running after ragplane up exited"
    )
    assert not (data_dir / "pg" / "postmaster.pid").exists()
    assert "Traceback" not in up.output()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{up.base_url}/health", timeout=5)


def test_dev_mode_refuses_a_non_loopback_host(data_dir: Path) -> None:
    proc = ragplane(
        "up", "--host", ALL_INTERFACES, "--port", str(_free_port()), "--data-dir", str(data_dir)
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error: invalid configuration" in proc.stderr
    assert "host in command-line option" in proc.stderr
    assert "dev_mode is refused unless the server binds to loopback" in proc.stderr
    assert "'0.0.0.0'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert READY_BANNER not in proc.stdout
    # refused before anything was started or written
    assert not (data_dir / "pg").exists()


def test_second_up_reuses_the_data_directory(
    start_up: Callable[[Path], Up], data_dir: Path
) -> None:
    first = start_up(data_dir)
    first_token = first.wait_ready()
    assert whoami(first, first_token).status_code == 200

    # an admin command on the same data directory attaches to the running server ...
    added = ragplane(
        "tenants", "add", "tnt_added_live", "--name", "Added Live", "--region", "us",
        "--data-dir", str(data_dir),
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert "added tenant tnt_added_live" in added.stdout
    # ... and leaves it running when it exits
    assert first.proc.poll() is None
    assert first.postmaster is not None
    assert _alive(first.postmaster)
    assert httpx.get(f"{first.base_url}/ready", timeout=10).status_code == 200
    minted = ragplane("token", "--tenant", "tnt_added_live", "--data-dir", str(data_dir))
    assert minted.returncode == 0, minted.stderr
    live_token = minted.stdout.strip().splitlines()[-1]
    r = whoami(first, live_token)
    assert r.status_code == 200, r.text
    assert (r.json()["tenant_id"], r.json()["region"]) == ("tnt_added_live", "us")

    secrets_file = (data_dir / "db-secrets.json").read_text()
    dev_keys_file = (data_dir / "dev-keys.json").read_text()
    assert first.terminate() == 0, first.output()
    assert _wait_until(lambda: _postmaster_pid(data_dir) is None, 10)

    second = start_up(data_dir)
    second_token = second.wait_ready()
    print(f"\nragplane up (existing data dir) ready after {second.ready_after_s:.1f} s")
    assert "Traceback" not in second.output()
    # same dev key: the token minted by the first run is still accepted
    assert (
        jwt.get_unverified_header(second_token)["kid"]
        == (jwt.get_unverified_header(first_token)["kid"])
    )
    r = whoami(second, first_token)
    assert r.status_code == 200, r.text
    assert (r.json()["tenant_id"], r.json()["region"]) == ("tnt_acme_eu", "eu")
    # the tenant registered during the first run is still there
    r = whoami(second, live_token)
    assert r.status_code == 200, r.text
    assert (r.json()["tenant_id"], r.json()["region"]) == ("tnt_added_live", "us")
    # nothing was re-initialised
    assert (data_dir / "db-secrets.json").read_text() == secrets_file
    assert (data_dir / "dev-keys.json").read_text() == dev_keys_file
    assert second.terminate() == 0, second.output()
