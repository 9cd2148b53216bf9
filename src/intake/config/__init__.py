"""Typed, validated settings loaded from config.toml and the environment.

:class:`ConfigError` is defined here, apart from the settings' models: modules that only raise it
(the OpenPGP key's reading, which the parse helper imports) need none of them.
"""


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and the reason."""
