"""load_settings: sources and their precedence, frozen values, and error messages that say
which key was wrong, where the value came from and what was expected."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from ragplane.config import Settings, load_settings
from ragplane.errors import ConfigError

ALL_INTERFACES = "0.0.0.0"  # noqa: S104


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No RAGPLANE_* or DATABASE_URL from the outer environment, and no ./ragplane.yaml."""
    for name in list(os.environ):
        if name.startswith("RAGPLANE_") or name == "DATABASE_URL":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def config_error(*args: object, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(*args, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


# --- sources and precedence -------------------------------------------------------------


def test_defaults_without_any_source() -> None:
    s = load_settings()
    assert s.port == 8080
    assert s.host == "127.0.0.1"
    assert s.region == "eu"
    assert s.dev_mode is False
    assert s.database.url is None
    assert s.embedded_database is True
    assert s.database.pool_max_size == 10


def test_yaml_values_load(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "settings.yaml",
        "port: 9001\n"
        "region: us\n"
        "log_format: console\n"
        "database:\n"
        "  pool_max_size: 3\n"
        "  connect_timeout_s: 1.5\n"
        "auth:\n"
        "  issuer: https://issuer.example\n"
        "edge:\n"
        "  trusted_proxies: ['10.0.0.0/8']\n",
    )
    s = load_settings(cfg)
    assert s.port == 9001
    assert s.region == "us"
    assert s.log_format == "console"
    assert s.database.pool_max_size == 3
    assert s.database.pool_min_size == 1  # untouched keys keep their defaults
    assert s.database.connect_timeout_s == 1.5
    assert s.auth.issuer == "https://issuer.example"
    assert s.auth.audience == "ragplane"
    assert [str(n) for n in s.edge.trusted_proxies] == ["10.0.0.0/8"]


def test_empty_yaml_file_means_defaults(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path / "empty.yaml", "# nothing here\n"))
    assert s.port == 8080


def test_default_file_in_working_directory_is_read(tmp_path: Path) -> None:
    write(tmp_path / "ragplane.yaml", "port: 9010\n")
    assert load_settings().port == 9010


def test_env_overrides_yaml_including_nested_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write(
        tmp_path / "settings.yaml",
        "port: 9001\nregion: us\ndatabase:\n  pool_max_size: 3\n  pool_min_size: 2\n",
    )
    monkeypatch.setenv("RAGPLANE_PORT", "9002")
    monkeypatch.setenv("RAGPLANE_DATABASE__POOL_MAX_SIZE", "7")
    s = load_settings(cfg)
    assert s.port == 9002
    assert s.database.pool_max_size == 7
    # keys the environment does not name still come from the file
    assert s.region == "us"
    assert s.database.pool_min_size == 2


def test_explicit_overrides_beat_env_and_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write(tmp_path / "settings.yaml", "port: 9001\nhost: 127.0.0.2\n")
    monkeypatch.setenv("RAGPLANE_PORT", "9002")
    monkeypatch.setenv("RAGPLANE_HOST", "localhost")
    s = load_settings(cfg, overrides={"port": 9003, "host": None})
    assert s.port == 9003
    # an override of None (an option the user did not give) does not mask lower sources
    assert s.host == "localhost"


def test_database_url_fills_database_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write(
        tmp_path / "settings.yaml",
        "database:\n  url: postgresql://from-yaml@/db\n  pool_max_size: 4\n",
    )
    assert load_settings(cfg).database.url is not None
    monkeypatch.setenv("DATABASE_URL", "postgresql://from-env@/db")
    s = load_settings(cfg)
    assert s.database.url is not None
    assert s.database.url.get_secret_value() == "postgresql://from-env@/db"
    assert s.database.pool_max_size == 4  # merged with, not replacing, the file's section
    assert s.embedded_database is False
    # the prefixed variable is more specific than the conventional one
    monkeypatch.setenv("RAGPLANE_DATABASE__URL", "postgresql://from-ragplane-env@/db")
    s = load_settings(cfg)
    assert s.database.url is not None
    assert s.database.url.get_secret_value() == "postgresql://from-ragplane-env@/db"


def test_database_url_is_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:hunter2@/db")
    s = load_settings()
    assert "hunter2" not in repr(s)
    assert "hunter2" not in str(s.database)


def test_ragplane_config_selects_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "ragplane.yaml", "port: 9010\n")
    chosen = write(tmp_path / "other.yaml", "port: 9020\nregion: us\n")
    monkeypatch.setenv("RAGPLANE_CONFIG", str(chosen))
    s = load_settings()
    assert s.port == 9020
    assert s.region == "us"
    # an explicit file (--config) wins over RAGPLANE_CONFIG
    explicit = write(tmp_path / "explicit.yaml", "port: 9030\n")
    assert load_settings(explicit).port == 9030


def test_settings_are_frozen(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path / "settings.yaml", "port: 9001\n"))
    with pytest.raises(ValidationError, match="frozen"):
        s.port = 1  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        s.database.pool_max_size = 99  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        s.auth.issuer = "someone-else"  # type: ignore[misc]
    assert s.port == 9001
    assert s.database.pool_max_size == 10


def test_settings_constructed_directly_reject_unknown_keys() -> None:
    with pytest.raises(ValidationError, match="prot"):
        Settings(prot=1)  # type: ignore[call-arg]


# --- error messages ---------------------------------------------------------------------


def test_wrong_type_in_yaml_names_key_file_and_expectation(tmp_path: Path) -> None:
    cfg = write(tmp_path / "settings.yaml", "database:\n  pool_max_size: lots\n")
    msg = config_error(cfg)
    assert "database.pool_max_size" in msg
    assert f"config file {cfg}" in msg
    assert "valid integer" in msg
    assert "'lots'" in msg


def test_section_of_wrong_type_in_yaml(tmp_path: Path) -> None:
    cfg = write(tmp_path / "settings.yaml", "database: 5\n")
    msg = config_error(cfg)
    assert "- database in" in msg
    assert f"config file {cfg}" in msg
    assert "dictionary" in msg


def test_out_of_range_value_in_yaml(tmp_path: Path) -> None:
    cfg = write(tmp_path / "settings.yaml", "auth:\n  leeway_s: 1000\n")
    msg = config_error(cfg)
    assert "auth.leeway_s" in msg
    assert f"config file {cfg}" in msg
    assert "less than or equal to 300" in msg
    assert "1000" in msg


def test_out_of_range_value_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAGPLANE_DATABASE__POOL_MAX_SIZE", "0")
    msg = config_error()
    assert "database.pool_max_size" in msg
    assert "environment variable RAGPLANE_DATABASE__POOL_MAX_SIZE" in msg
    assert "greater than or equal to 1" in msg


def test_env_error_names_env_even_when_yaml_sets_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write(tmp_path / "settings.yaml", "port: 9001\n")
    monkeypatch.setenv("RAGPLANE_PORT", "abc")
    msg = config_error(cfg)
    assert "- port in environment variable RAGPLANE_PORT" in msg
    assert "valid integer" in msg
    assert str(cfg) not in msg


def test_unknown_top_level_key_in_yaml(tmp_path: Path) -> None:
    cfg = write(tmp_path / "settings.yaml", "prot: 9001\n")
    msg = config_error(cfg)
    assert "- prot in" in msg
    assert f"config file {cfg}" in msg
    assert "no such setting" in msg


def test_unknown_nested_key_in_yaml(tmp_path: Path) -> None:
    cfg = write(tmp_path / "settings.yaml", "database:\n  pool_max_sze: 4\n")
    msg = config_error(cfg)
    assert "database.pool_max_sze" in msg
    assert f"config file {cfg}" in msg
    assert "no such setting (check the spelling)" in msg


@pytest.mark.parametrize(
    ("name", "key"),
    [("RAGPLANE_PROT", "prot"), ("RAGPLANE_DATABSE__URL", "databse__url")],
)
def test_misspelt_top_level_env_var_is_an_error_not_ignored(
    monkeypatch: pytest.MonkeyPatch, name: str, key: str
) -> None:
    monkeypatch.setenv(name, "1")
    msg = config_error()
    assert f"- {key} in environment variable {name}" in msg
    assert "no such setting (check the spelling)" in msg


def test_misspelt_nested_env_var_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAGPLANE_DATABASE__POOL_MAX_SZE", "4")
    msg = config_error()
    assert "- database.pool_max_sze in environment variable RAGPLANE_DATABASE__POOL_MAX_SZE" in msg
    assert "no such setting (check the spelling)" in msg


def test_ragplane_config_is_not_taken_for_a_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cfg = write(tmp_path / "settings.yaml", "port: 9001\n")
    monkeypatch.setenv("RAGPLANE_CONFIG", str(cfg))
    assert load_settings().port == 9001


def test_invalid_enum_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAGPLANE_REGION", "mars")
    msg = config_error()
    assert "- region in environment variable RAGPLANE_REGION" in msg
    assert "'eu' or 'us'" in msg
    assert "'mars'" in msg


def test_invalid_port_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAGPLANE_PORT", "abc")
    msg = config_error()
    assert "- port in environment variable RAGPLANE_PORT" in msg
    assert "valid integer" in msg


def test_invalid_override_names_the_command_line(tmp_path: Path) -> None:
    msg = config_error(None, overrides={"port": 70000})
    assert "- port in command-line option" in msg
    assert "less than or equal to 65535" in msg


def test_every_invalid_key_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write(tmp_path / "settings.yaml", "log_level: loud\n")
    monkeypatch.setenv("RAGPLANE_REGION", "mars")
    msg = config_error(cfg)
    assert f"- log_level in config file {cfg}" in msg
    assert "- region in environment variable RAGPLANE_REGION" in msg


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    cfg = write(tmp_path / "settings.yaml", "port: 9001\nregion: eu\nhost: [unclosed\n")
    msg = config_error(cfg)
    assert f"config file {cfg} is not valid YAML" in msg
    assert "at line 4" in msg


def test_yaml_tab_indentation_error_names_its_line(tmp_path: Path) -> None:
    cfg = write(tmp_path / "settings.yaml", "database:\n  pool_max_size: 3\n\turl: x\n")
    msg = config_error(cfg)
    assert f"config file {cfg} is not valid YAML" in msg
    assert "at line 3" in msg


def test_top_level_yaml_must_be_a_mapping(tmp_path: Path) -> None:
    cfg = write(tmp_path / "settings.yaml", "- port\n- 9001\n")
    msg = config_error(cfg)
    assert f"config file {cfg}" in msg
    assert "expected a mapping of settings at the top level, got list" in msg


def test_top_level_scalar_yaml(tmp_path: Path) -> None:
    cfg = write(tmp_path / "settings.yaml", "just a string\n")
    msg = config_error(cfg)
    assert "expected a mapping" in msg
    assert "got str" in msg


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    msg = config_error(missing)
    assert f"cannot read config file {missing}" in msg
    assert "No such file or directory" in msg


def test_missing_file_named_by_ragplane_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "from-env.yaml"
    monkeypatch.setenv("RAGPLANE_CONFIG", str(missing))
    msg = config_error()
    assert f"cannot read config file {missing}" in msg


def test_unreadable_config_file(tmp_path: Path) -> None:
    # a directory cannot be read as a file, even by root (chmod 000 would not stop root)
    directory = tmp_path / "settings.yaml"
    directory.mkdir()
    msg = config_error(directory)
    assert f"cannot read config file {directory}" in msg
    assert "Is a directory" in msg


def test_config_file_that_is_not_utf8(tmp_path: Path) -> None:
    cfg = tmp_path / "settings.yaml"
    cfg.write_bytes(b"issuer: caf\xe9\n")
    msg = config_error(cfg)
    assert f"config file {cfg} is not valid UTF-8" in msg


def test_dev_mode_refuses_non_loopback_host_from_overrides() -> None:
    msg = config_error(None, overrides={"dev_mode": True, "host": ALL_INTERFACES})
    assert "- host in command-line option" in msg
    assert "loopback" in msg
    assert "'0.0.0.0'" in msg


def test_dev_mode_refuses_non_loopback_host_from_yaml(tmp_path: Path) -> None:
    cfg = write(tmp_path / "settings.yaml", "dev_mode: true\nhost: 192.0.2.10\n")
    msg = config_error(cfg)
    assert f"- host in config file {cfg}" in msg
    assert "dev_mode is refused unless the server binds to loopback" in msg


def test_dev_mode_refuses_non_loopback_host_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAGPLANE_DEV_MODE", "true")
    monkeypatch.setenv("RAGPLANE_HOST", "example.com")
    msg = config_error()
    assert "- host in environment variable RAGPLANE_HOST" in msg
    assert "loopback" in msg


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "::1", "localhost"])
def test_dev_mode_on_loopback_is_allowed(host: str) -> None:
    s = load_settings(overrides={"dev_mode": True, "host": host})
    assert s.dev_mode is True
    assert s.host == host


def test_non_loopback_host_is_fine_without_dev_mode() -> None:
    assert load_settings(overrides={"host": ALL_INTERFACES}).host == ALL_INTERFACES
