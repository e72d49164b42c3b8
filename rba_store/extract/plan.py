"""What an extraction will do: its options, the model, the data and the store's layout, checked
before anything is written, and the description (with its fingerprint) the store will carry."""

from __future__ import annotations

import dataclasses
import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rba_store.errors import UsageError
from rba_store.extract.capture import ActivationCapture
from rba_store.extract.data import DataSource, Preprocess, make_preprocess, open_source
from rba_store.extract.language_model import is_language_model_dir
from rba_store.extract.models import LoadedModel, build_model
from rba_store.extract.token_sample import TokenSampler, random_tokens
from rba_store.store import (
    FORMAT_VERSION,
    NOT_STORED,
    WEIGHTS_PATH,
    CapturePoint,
    StoreLayout,
    fingerprint,
    normalize,
    plan_layout,
)
from rba_store.store.layout import DEFAULT_CODEC
from rba_store.store.points import parse_points
from rba_store.store.selection import split_holdout

DEFAULT_DATA = "digits"


@dataclass(frozen=True)
class ExtractOptions:
    """Everything ``rba-store extract`` can be asked for."""

    model: str | None = None
    checkpoint: Path | None = None
    pretrained: bool = False
    data: str = DEFAULT_DATA
    split: str | None = None
    limit: int | None = None
    tokens: str = "all"
    dtype: str = "float32"
    codec: str = DEFAULT_CODEC
    clevel: int = 3
    batch_size: int = 64
    device: str = "cpu"
    chunk_mb: float = 4.0
    shard_mb: float = 16.0
    chunk_samples: int | None = None
    shard_samples: int | None = None
    skip_unreadable: bool = False  # leave out images that do not decode (else refuse them)
    stats: bool = False  # accumulate the statistics and joint moments during the pass
    store_activations: bool = True  # False: statistics only, the h arrays are never written
    stats_holdout: float | None = None  # with stats: keep these samples' joint moments apart
    stats_holdout_seed: int = 0
    num_workers: int = 1  # processes filling the same store, each its own shards
    worker_index: int = 0
    seq_len: int | None = None  # language models: tokens per window (default: min(256, context))
    checkpoint_every: float = 60.0  # with stats: seconds between saves of this worker's partials
    mlp_outputs: bool = False  # also capture m1 .. mL, each block's MLP output (folded fits)
    points: str | None = None  # --points 0,4,8,12: store only these h_k (None: every one)


@dataclass
class ExtractionPlan:
    """A model, a data source and a store layout, checked and ready; nothing written yet."""

    options: ExtractOptions
    loaded: LoadedModel
    source: DataSource
    capture: ActivationCapture
    preprocess: Preprocess | None  # None for text: the windows are model inputs already
    layout: StoreLayout
    description: dict[str, Any] = field(default_factory=dict)
    weights_payload: bytes | None = None  # random weights, to be kept in the store
    sampler: TokenSampler | None = None  # --tokens random:K

    @property
    def random_weights(self) -> bool:
        return self.loaded.weights["source"] == "random"


def _library_versions() -> dict[str, str]:
    import dask
    import numcodecs
    import timm
    import xarray
    import zarr

    from rba_store import __version__

    return {
        "rba_store": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "numpy": np.__version__,
        "dask": dask.__version__,
        "xarray": xarray.__version__,
    }


def capture_tokens(tokens: str) -> str:
    """What the capture keeps: every token when ``random:K`` picks among them afterwards."""
    return "all" if random_tokens(tokens) is not None else tokens


def stored_points(text: str | None, n_blocks: int, model: str) -> tuple[int, ...]:
    """The ``h_k`` that ``--points`` keeps (empty: every one); at least two, to span a block."""
    if text is None:
        return ()
    blocks = parse_points(text, n_blocks + 1, f"{model!r}")
    if len(blocks) < 2:
        raise UsageError(
            f"--points {text!r} keeps {len(blocks)} point; fits and statistics need at least "
            "two (a span (a, b] maps h_a to h_b): pass e.g. 0,4,8,12"
        )
    return () if len(blocks) == n_blocks + 1 else tuple(blocks)


def _check_options(options: ExtractOptions) -> None:
    if options.tokens not in ("all", "cls", "last") and random_tokens(options.tokens) is None:
        raise UsageError(
            f"--tokens {options.tokens!r} is not valid; use all, cls, last or random:K"
        )
    if not options.store_activations and not options.stats:
        raise UsageError("--no-activations keeps only the statistics: add --stats")
    if options.points is not None and options.mlp_outputs:
        raise UsageError(
            "--points stores some of h0..hL, --mlp-outputs every block's MLP output (folded "
            "fits need h_a, h_b and m_a of every span): pass one of them"
        )
    if options.stats_holdout is not None and not options.stats:
        raise UsageError("--holdout splits the statistics computed during the pass: add --stats")
    if options.batch_size < 1:
        raise UsageError(f"--batch-size {options.batch_size} is invalid; pass a positive number")
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(
            f"--device {options.device!r} asked for, but no CUDA GPU is visible; use --device cpu"
        )
    try:
        torch.device(options.device)
    except RuntimeError as e:
        raise UsageError(
            f"--device {options.device!r} is not a torch device; use cpu or cuda"
        ) from e
    if options.num_workers < 1:
        raise UsageError(f"--num-workers {options.num_workers} is invalid; pass 1 or more")
    if not 0 <= options.worker_index < options.num_workers:
        raise UsageError(
            f"--worker-index {options.worker_index} is out of range for --num-workers "
            f"{options.num_workers}; pass 0..{options.num_workers - 1}"
        )
    top = 9 if options.codec.startswith("blosc") else 22
    if not 0 <= options.clevel <= top:
        raise UsageError(
            f"--clevel {options.clevel} is out of range for --codec {options.codec}; use 0..{top}"
        )
    if not options.checkpoint_every >= 0:
        raise UsageError(
            f"--checkpoint-every {options.checkpoint_every} is invalid; pass seconds >= 0"
        )
    for flag, value in (("--chunk-mb", options.chunk_mb), ("--shard-mb", options.shard_mb)):
        if not value > 0:
            raise UsageError(f"{flag} {value} is invalid; pass a positive size in MB (e.g. 4)")


def plan_extraction(options: ExtractOptions, *, count_only: bool = False) -> ExtractionPlan:
    """Build the model and the data source and probe the shapes, without touching any store.

    ``count_only`` (``--dry-run``): count the images of a folder without decoding them all (the
    run itself refuses, or skips, the unreadable ones)."""
    _check_options(options)
    if is_language_model_dir(options.model):
        return _plan_language(options)
    language_only = {"--seq-len": options.seq_len, "--tokens last": options.tokens == "last"}
    for flag, value in language_only.items():
        if value:
            raise UsageError(
                f"{flag} is for language models (--model DIR holding a Hugging Face config.json); "
                "drop it for a vision model"
            )
    source = open_source(
        options.data,
        options.split,
        options.limit,
        skip_unreadable=None if count_only else options.skip_unreadable,
    )
    loaded = build_model(
        options.model,
        checkpoint=options.checkpoint,
        pretrained=options.pretrained,
        device=options.device,
    )
    capture = ActivationCapture(loaded, capture_tokens(options.tokens), options.mlp_outputs)
    preprocess = make_preprocess(loaded.data_config)
    preprocessing = "none (inputs given as arrays)" if source.preprocessed else loaded.data_config
    return _finish_plan(options, loaded, source, capture, preprocess, preprocessing)


def _plan_language(options: ExtractOptions) -> ExtractionPlan:
    """A Hugging Face decoder over text windows (see extract/language_model.py and text.py)."""
    from rba_store.extract.capture import DecoderCapture
    from rba_store.extract.default_lm import ensure_default_corpus, is_default_lm
    from rba_store.extract.language_model import build_language_model, context_length
    from rba_store.extract.text import DEFAULT_SEQ_LEN, TextSource

    vision_only = {
        "--checkpoint": options.checkpoint is not None,
        "--pretrained": options.pretrained,
        "--skip-unreadable": options.skip_unreadable,
        "--tokens cls": options.tokens == "cls",
    }
    for flag, given in vision_only.items():
        if given:
            raise UsageError(
                f"{flag} is for vision models; {options.model!r} is a language model (its "
                "weights are in its folder): drop it"
                + ("; use --tokens all or last" if "tokens" in flag else "")
            )
    if options.data == DEFAULT_DATA and is_default_lm(options.model):  # its shipped corpus
        options = dataclasses.replace(options, data=str(ensure_default_corpus()))
    if options.data == DEFAULT_DATA:
        raise UsageError(
            "a language model reads text: pass --data with a .txt file, a folder of text files "
            "or a .jsonl file with a 'text' field"
        )
    loaded = build_language_model(str(options.model), options.device)
    context = context_length(loaded.module.config)
    seq_len = options.seq_len or min(DEFAULT_SEQ_LEN, context or DEFAULT_SEQ_LEN)
    if context is not None and seq_len > context:
        raise UsageError(
            f"--seq-len {seq_len} is above the context of {loaded.name!r} ({context} tokens); "
            f"pass at most {context}"
        )
    source = TextSource(options.data, loaded.tokenizer, seq_len, options.split or "train")
    capture = DecoderCapture(loaded, capture_tokens(options.tokens), options.mlp_outputs)
    preprocessing = {"tokenizer": loaded.data_config["tokenizer"], "seq_len": seq_len}
    return _finish_plan(
        options, loaded, source.limited(options.limit), capture, None, preprocessing, seq_len
    )


def _finish_plan(
    options: ExtractOptions,
    loaded: LoadedModel,
    source: DataSource,
    capture: Any,
    preprocess: Preprocess | None,
    preprocessing: Any,
    seq_len: int | None = None,
) -> ExtractionPlan:
    """Probe the shapes on one sample, plan the layout and write the description."""
    probe = capture(source.load(0, 1, preprocess).to(options.device))
    n_captured = len(probe.points)  # h0..hL, then m1..mL with --mlp-outputs
    n_blocks = (n_captured - 1) // 2 if options.mlp_outputs else n_captured - 1
    blocks = stored_points(options.points, n_blocks, loaded.name)
    capture.keep = blocks
    probe = probe.kept(blocks)
    k = random_tokens(options.tokens)
    sampler = None
    if k is not None:
        prefix = int(getattr(loaded.module, "num_prefix_tokens", 0) or 0)
        sampler = TokenSampler(prefix, probe.points[0].shape[1], k)
        probe.points = sampler.take(probe.points, sampler.positions(0, 1))
    points = [
        CapturePoint(p.shape[1], p.shape[2], tuple(s))
        for p, s in zip(probe.points, probe.source_shapes, strict=True)
    ]
    n_h = (len(points) + 1) // 2 if options.mlp_outputs else len(points)  # h0..hL, m1..mL
    layout = plan_layout(
        len(source),
        points[:n_h],
        probe.features.shape[1],
        options.dtype,
        codec=options.codec,
        clevel=options.clevel,
        chunk_mb=options.chunk_mb,
        shard_mb=options.shard_mb,
        chunk_samples=options.chunk_samples,
        shard_samples=options.shard_samples,
        sample_ids=source.sample_ids,
        seq_len=seq_len,
        mlp_points=points[n_h:],
        point_blocks=blocks,
        model_blocks=n_blocks,
    )
    if options.stats:  # refuse a fraction that leaves nothing to fit before any work
        split_holdout(np.arange(layout.n_samples), options.stats_holdout)
    payload = None
    if loaded.weights["source"] == "random":  # kept in the store: never re-drawn
        from safetensors.torch import save

        state = {k: v.detach().cpu().contiguous() for k, v in loaded.module.state_dict().items()}
        payload = save(state)
        loaded.weights["stored"] = WEIGHTS_PATH
    description: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "kind": "activations",
        "model": loaded.describe() | {"capture_method": capture.method},
        "data": source.describe(),
        "preprocessing": preprocessing,
        "tokens": options.tokens,
        **({"token_sampling": sampler.describe()} if sampler else {}),
        **({} if options.store_activations else {"activations": NOT_STORED}),
        "dtype": options.dtype,
        "codec": {"name": options.codec, "clevel": options.clevel},
        "layout": layout.to_attrs(),
        "versions": _library_versions(),
        "run": {
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": options.device,
            "batch_size": options.batch_size,
            "num_workers": options.num_workers,  # names missing workers of an unfinished store
        },
    }
    description = normalize(description)
    description["fingerprint"] = fingerprint(description)
    return ExtractionPlan(
        options, loaded, source, capture, preprocess, layout, description, payload, sampler
    )
