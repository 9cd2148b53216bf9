"""Typed, validated settings loaded from config.toml and the environment."""
