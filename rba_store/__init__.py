"""rba-store: find and replace redundant blocks of neural networks from an out-of-core store.

Importing the package imports neither torch, timm nor CuPy; each module imports what it needs.
"""

from rba_store.errors import (
    ConfigMismatchError,
    DataSourceError,
    IncompleteStoreError,
    ModelError,
    RBAStoreError,
    StoreError,
    UsageError,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigMismatchError",
    "DataSourceError",
    "IncompleteStoreError",
    "ModelError",
    "RBAStoreError",
    "StoreError",
    "UsageError",
    "__version__",
]
