"""LLM gateway: OpenAI/Anthropic-compatible API, routing, resilience and the cost ledger.

The design is in docs/gateway.md.
"""
