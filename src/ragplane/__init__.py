"""ragplane: edge, RAG service and LLM gateway over a tenant-isolated data plane."""

from importlib.metadata import version as _version

__all__ = ["__version__"]

__version__ = _version("ragplane")
