"""Knowledge base: parsing, chunking, embedding, idempotent ingestion and hybrid retrieval."""
