"""``main``: run the app and turn every error into one line on stderr and an exit code.

``--verbose`` (anywhere on the command line) adds the traceback and INFO logging; ``--threads N``
(anywhere too) sets the CPU threads of torch and BLAS (:mod:`rba_store.cli.threads`).
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Any

import typer
from typer.exceptions import TyperException

from rba_store.cli.app import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, app
from rba_store.cli.threads import cpu_threads, default_threads, pop_threads
from rba_store.errors import Interrupted, RBAStoreError, describe_os_error


def _error(message: str, code: int) -> int:
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    print(f"rba-store: error: {first}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (never raises on bad input)."""
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = any(a in ("--verbose", "-v") for a in args)
    if verbose:  # accepted anywhere on the line, passed to the root callback
        args = ["--verbose", *(a for a in args if a not in ("--verbose", "-v"))]
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args, threads = pop_threads(args)
        with cpu_threads(threads or default_threads(), explicit=threads is not None):
            result: Any = app(args=args, prog_name="rba-store", standalone_mode=False)
    except TyperException as e:  # usage errors from parsing (typer's vendored click)
        if type(e).__name__ == "NoArgsIsHelpError":
            e.show()  # type: ignore[attr-defined]
            return EXIT_USAGE
        ctx = getattr(e, "ctx", None)
        hint = f" (see 'rba-store {ctx.info_name} --help')" if ctx and ctx.parent else ""
        message = e.format_message().replace(": Value error, ", ": ")  # typer's wording
        return _error(message + hint, EXIT_USAGE)
    except Interrupted as e:
        return _error(str(e), EXIT_INTERRUPTED)
    except (typer.Abort, KeyboardInterrupt):
        return _error(
            "interrupted; nothing stored was changed: re-run the same command", EXIT_INTERRUPTED
        )
    except RBAStoreError as e:  # the error's own code: 2 for usage errors, 1 otherwise
        if verbose:
            traceback.print_exc()
        return _error(str(e), e.exit_code)
    except OSError as e:
        if verbose:
            traceback.print_exc()
        return _error(describe_os_error(e), EXIT_ERROR)
    except Exception as e:  # a bug: say so in one line, the traceback with --verbose
        if verbose:
            traceback.print_exc()
        return _error(
            f"internal error {type(e).__name__}: {e} (re-run with --verbose for the traceback "
            "and report it)",
            EXIT_ERROR,
        )
    return result if isinstance(result, int) else 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
