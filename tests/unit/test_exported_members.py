"""The public names of every module are a contract: each name in ``__all__`` exists,
and every module of the package declares ``__all__``."""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

import pytest

import ragplane

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(ragplane.__path__, prefix="ragplane.")
    if not m.name.startswith("ragplane.data.migrations")
)


def test_the_package_has_the_expected_layers() -> None:
    packages = {m.rsplit(".", 1)[0] for m in MODULES} | set(MODULES)
    for layer in ("edge", "service", "data", "control", "observe", "evals"):
        assert f"ragplane.{layer}" in packages


@pytest.mark.parametrize("name", MODULES)
def test_every_exported_name_exists(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    if exported is None:
        # packages may be plain namespaces with a docstring and nothing else
        public = [
            n
            for n, v in vars(module).items()
            if not n.startswith("_") and n != "annotations" and not isinstance(v, ModuleType)
        ]
        assert not public, f"{name} defines public names but no __all__: {public}"
        return
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what it does not define: {missing}"
    assert len(set(exported)) == len(exported), f"{name}.__all__ has duplicates"


def test_version_is_exported() -> None:
    assert ragplane.__version__ == importlib.metadata.version("ragplane")
