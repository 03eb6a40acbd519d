"""AI service: the HTTP API and (later) the RAG request lifecycle."""
