"""The Typer app, its exit codes, and the options shared by several commands."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from rba_store.errors import UsageError

app = typer.Typer(
    name="rba-store",
    help="Find and replace redundant blocks of neural networks from an activation store.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class Tokens(str, Enum):
    all = "all"
    cls = "cls"


class DType(str, Enum):
    float32 = "float32"
    float16 = "float16"


class Classifier(str, Enum):
    auto = "auto"
    head = "head"
    probe = "probe"


class Codec(str, Enum):
    blosc_zstd = "blosc-zstd"
    zstd = "zstd"
    blosc_lz4 = "blosc-lz4"
    none = "none"


# Options shared by several commands.
StoreArg = Annotated[
    Path, typer.Argument(help="A store written by 'rba-store extract'.", metavar="STORE")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for machines.")]
LimitOpt = Annotated[int | None, typer.Option(help="Use the first N samples.")]
SampleOpt = Annotated[int | None, typer.Option(help="Use N samples drawn at random.")]
HoldoutOpt = Annotated[
    float | None,
    typer.Option(help="Hold out this fraction of the samples (drawn with --seed) for diagnostics."),
]
SchedulerOpt = Annotated[
    str | None, typer.Option(help="Address of a running dask.distributed scheduler.")
]
SchedulerFileOpt = Annotated[
    Path | None, typer.Option(help="Scheduler file of a running dask.distributed cluster.")
]
ClassifierOpt = Annotated[
    Classifier,
    typer.Option(
        help="The model's own head, or a linear probe on the stored features (auto: the head "
        "when the model was trained for the data, i.e. the embedded default)."
    ),
]
CheckpointOpt = Annotated[
    Path | None, typer.Option(help="The model's weights file, if it has moved.")
]
TokensOpt = Annotated[
    Tokens | None,
    typer.Option(help="Token vectors: all or cls [what the store holds].", show_default=False),
]
AllowIncompleteOpt = Annotated[
    bool, typer.Option(help="Use the complete shards of an unfinished store.")
]


@app.callback()
def _root(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show tracebacks and progress logging.")
    ] = False,
) -> None:
    """rba-store: extract activations once, then analyse them out of core."""


class Backend(str, Enum):
    auto = "auto"
    numpy = "numpy"
    cupy = "cupy"


class Gemm(str, Enum):
    float64 = "float64"
    float32 = "float32"


class Source(str, Enum):
    auto = "auto"
    moments = "moments"
    activations = "activations"


def check_folder(path: Path | None, flag: str) -> None:
    """Refuse an output folder that is an existing file, before any work is done."""
    if path is not None and path.exists() and not path.is_dir():
        raise UsageError(
            f"{flag} {str(path)!r} is a file; pass a folder (it is created when missing)"
        )


def mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MB"
