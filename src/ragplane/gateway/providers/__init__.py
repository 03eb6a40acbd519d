"""Provider adapters (pure translation, one file per caller API × provider) and local providers."""
