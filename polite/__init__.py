"""Polite Flamingo dataset factory: the application's face (CLI, settings, records, workspace)."""

from polite.env import configure_runtime_env

configure_runtime_env()

__version__ = "0.1.0"
