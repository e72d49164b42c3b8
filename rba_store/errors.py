"""The exception hierarchy of rba-store.

Every error the library raises on bad input derives from :class:`RBAStoreError` and from the
builtin that best describes it, so callers can catch either. The CLI turns them into one line on
stderr and a non-zero exit code.
"""

from __future__ import annotations


class RBAStoreError(Exception):
    """Base class of every error raised by rba-store on bad input or a bad store."""


class UsageError(RBAStoreError, ValueError):
    """An option or argument has a value that cannot work."""


class DataSourceError(RBAStoreError, ValueError):
    """A data source is missing, empty or holds an unreadable sample."""


class ModelError(RBAStoreError, ValueError):
    """A model cannot be built, its weights cannot be loaded, or its blocks cannot be found."""


class StoreError(RBAStoreError, OSError):
    """A path is not an rba-store store, or the store is unreadable or from a newer format."""


class ConfigMismatchError(RBAStoreError, ValueError):
    """An existing store was made with a different configuration than the one asked for."""


class IncompleteStoreError(RBAStoreError, ValueError):
    """A store has shards that were never written (an interrupted extraction)."""


class NonFiniteError(RBAStoreError, ValueError):
    """Stored activations hold NaN or Inf."""


class Interrupted(RBAStoreError):
    """The user stopped a command (Ctrl-C); the message says what is kept and how to resume."""


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
