"""The Typer app, its exit codes, and the options shared by several commands."""

from __future__ import annotations

import errno
import os
from enum import Enum
from pathlib import Path
from typing import Annotated

import click
import typer
from typer.core import TyperGroup

from rba_store.errors import UsageError

# The commands in the order a user runs them; commands not named here follow, as registered.
PIPELINE = (
    "extract",
    "info",
    "validate",
    "stats",
    "modularity",
    "probe",
    "fit",
    "evaluate",
    "select",
    "apply",
)
GLOBAL_OPTIONS = (
    "Anywhere on the line: --threads N (CPU threads of torch, BLAS and Dask's local scheduler; "
    "default $OMP_NUM_THREADS for torch and BLAS, else half the CPUs, and every core for Dask), "
    "--verbose/-v (tracebacks and progress logging)."
)


class PipelineGroup(TyperGroup):
    """Lists the commands in pipeline order, and ends every command's help with the options
    that :func:`rba_store.cli.main.main` takes anywhere on the line."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = super().list_commands(ctx)
        rank = {name: i for i, name in enumerate(PIPELINE)}
        return sorted(names, key=lambda name: rank.get(name, len(PIPELINE)))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is not None and not command.epilog:
            command.epilog = GLOBAL_OPTIONS
        return command


app = typer.Typer(
    name="rba-store",
    help="Find and replace redundant blocks of neural networks from an activation store.",
    cls=PipelineGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class Tokens(str, Enum):
    all = "all"
    cls = "cls"  # vision models with a class token
    last = "last"  # language models: the last position of each window


class DType(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


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
    typer.Option(
        help="Token vectors: all, cls or last [what the store holds].", show_default=False
    ),
]
AllowIncompleteOpt = Annotated[
    bool, typer.Option(help="Use the complete shards of an unfinished store.")
]
TimeBudgetOpt = Annotated[
    float,
    typer.Option(
        help="Seconds of img/s timing per variant, after the evaluation: a warm-up and up to 5 "
        "passes of a small batch (0: no timing).",
        metavar="SECONDS",
    ),
]


def _show_version(value: bool) -> None:
    if value:
        from rba_store import __version__

        typer.echo(f"rba-store {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", help="Show tracebacks and progress logging (anywhere on the line)."
        ),
    ] = False,
    threads: Annotated[
        int | None,
        typer.Option(
            help="CPU threads of torch, BLAS and Dask's local scheduler, anywhere on the line "
            "[default: $OMP_NUM_THREADS, else half the CPUs; Dask: every core].",
            metavar="N",
            show_default=False,
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version and exit.", callback=_show_version, is_eager=True
        ),
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


class CkaPairs(str, Enum):
    auto = "auto"
    band = "band"
    all = "all"


def check_folder(path: Path | None, flag: str) -> None:
    """Refuse an output folder that is an existing file, before any work is done."""
    if path is not None and path.exists() and not path.is_dir():
        raise UsageError(
            f"{flag} {str(path)!r} is a file; pass a folder (it is created when missing)"
        )


def check_output_file(path: Path | None, flag: str) -> None:
    """Refuse, before any work, an output file that cannot be written where it is named."""
    if path is None:
        return
    if path.is_dir():
        raise UsageError(f"{flag} {str(path)!r} is a folder; pass a file path (e.g. out.json)")
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(
            f"{flag} {str(path)!r}: the folder {str(parent)!r} does not exist; create it or "
            "choose another path"
        )
    if not os.access(parent, os.W_OK):
        raise OSError(errno.EACCES, "Permission denied", str(parent))
