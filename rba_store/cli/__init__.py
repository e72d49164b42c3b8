"""The ``rba-store`` command line: parse options, call the library, print a summary.

One module per group of commands (the store, the analyses, the smaller model); the app, its exit
codes and the shared options live in :mod:`rba_store.cli.app`; errors become one line on stderr
in :mod:`rba_store.cli.main`.
"""

from rba_store.cli import (
    analysis_commands,
    model_commands,
    reading_commands,
    select_command,
    store_commands,
)
from rba_store.cli.app import app
from rba_store.cli.main import main, run

__all__ = [
    "analysis_commands",
    "app",
    "main",
    "model_commands",
    "reading_commands",
    "run",
    "select_command",
    "store_commands",
]
