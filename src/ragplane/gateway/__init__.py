"""LLM gateway: OpenAI/Anthropic-compatible API, routing, resilience, cost ledger (docs/gateway.md)."""
