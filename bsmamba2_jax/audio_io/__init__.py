"""Audio files around the separator: reading inputs (`reader`), writing stems (`writer`), and where
they are found and go (`paths`). Nothing here imports JAX."""
