"""A template third-party UMBRELLA study plugin: see ``plugin.py`` and the README."""

__version__ = "0.1.0"
