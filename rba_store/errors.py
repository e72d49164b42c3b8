"""The exception hierarchy of rba-store.

Every error the library raises on bad input derives from :class:`RBAStoreError` and from the
builtin that best describes it, so callers can catch either. The CLI turns them into one line on
stderr and the error's ``exit_code``:

- **2, a usage error**: the command line cannot be carried out as written: a malformed or
  invalid option value, options that exclude each other, or something it names that does not
  exist (a store, file, folder, model, split, fit or statistics). The fix is in the command line.
- **1, everything else**: the command was valid, but what it found stops it: a store that is
  incomplete, corrupt, from a newer format or made with another configuration, unreadable images
  or weights, NaN/Inf, a full disk or a read-only folder.
- **130**: interrupted (Ctrl-C); the message says what was kept and how to go on.
"""

from __future__ import annotations


class RBAStoreError(Exception):
    """Base class of every error raised by rba-store on bad input or a bad store."""

    exit_code = 1


class UsageError(RBAStoreError, ValueError):
    """An option or argument has a value that cannot work (exit code 2)."""

    exit_code = 2


class NotFoundError(UsageError, FileNotFoundError):
    """A path named on the command line does not exist, or is not what it should be."""


class DataSourceError(RBAStoreError, ValueError):
    """A data source is missing, empty or holds an unreadable sample."""


class ModelError(RBAStoreError, ValueError):
    """A model cannot be built, its weights cannot be loaded, or its blocks cannot be found."""


class StoreError(RBAStoreError, OSError):
    """A store is unreadable or from a newer format."""


class ConfigMismatchError(RBAStoreError, ValueError):
    """An existing store was made with a different configuration than the one asked for."""


class IncompleteStoreError(RBAStoreError, ValueError):
    """A store has shards that were never written (an interrupted extraction)."""


class NonFiniteError(RBAStoreError, ValueError):
    """Stored activations hold NaN or Inf."""


class MemoryBudgetError(RBAStoreError, MemoryError):
    """A configuration needs more memory than the machine has; the message gives the figure and
    the alternatives (exit code 1: the command line is valid, the machine is too small)."""


class UnknownModelError(ModelError, UsageError):
    """A model name that timm does not know."""

    exit_code = 2


class UnknownSplitError(DataSourceError, UsageError):
    """A data split that the source does not have."""

    exit_code = 2


class Interrupted(RBAStoreError):
    """The user stopped a command (Ctrl-C); the message says what is kept and how to resume."""

    exit_code = 130


def describe_os_error(error: OSError) -> str:
    """One line for an operating-system error: what failed, where, and what to do about it."""
    import errno

    if isinstance(error, RBAStoreError):
        return str(error)
    where = f" {str(error.filename)!r}" if error.filename else ""
    reason = error.strerror or str(error)
    if error.errno == errno.ENOSPC or error.errno == errno.EDQUOT:
        return (
            f"no space left on the device writing{where} ({reason}); free some space or write "
            "elsewhere, then re-run (what was stored before is unchanged)"
        )
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (
            f"cannot write{where}: it is read-only ({reason}); make it writable (chmod u+w) or "
            "copy the store to a writable place, then re-run"
        )
    return f"{reason}{where}; check the path and its permissions, then re-run"
