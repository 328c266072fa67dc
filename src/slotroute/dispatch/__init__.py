"""The dispatcher: resolves model ids and capabilities to slot endpoints."""
