"""The activation store: the handle, its layout and protocol, the ledger, worker claims, saved
analyses, and what reads it (info, validate, sample selection, shard tasks)."""

from rba_store.store.analyses import FITS, STATS, analysis_path
from rba_store.store.fingerprint import fingerprint, normalize, normalize_json
from rba_store.store.handle import Store
from rba_store.store.layout import (
    CODECS,
    DEFAULT_CODEC,
    DTYPES,
    FEATURES,
    FORMAT_VERSION,
    INPUT_IDS,
    LABEL,
    LEDGER_PATH,
    NOT_STORED,
    SAMPLE_ID,
    TOKEN_POSITIONS,
    WEIGHTS_PATH,
    CapturePoint,
    StoreLayout,
    compressors,
    decode_sample_ids,
    encode_sample_ids,
    h_name,
    plan_layout,
)
from rba_store.store.selection import SampleSelection

__all__ = [
    "CODECS",
    "DEFAULT_CODEC",
    "DTYPES",
    "FEATURES",
    "FITS",
    "FORMAT_VERSION",
    "INPUT_IDS",
    "LABEL",
    "LEDGER_PATH",
    "NOT_STORED",
    "SAMPLE_ID",
    "STATS",
    "TOKEN_POSITIONS",
    "WEIGHTS_PATH",
    "CapturePoint",
    "SampleSelection",
    "Store",
    "StoreLayout",
    "analysis_path",
    "compressors",
    "decode_sample_ids",
    "encode_sample_ids",
    "fingerprint",
    "h_name",
    "normalize",
    "normalize_json",
    "plan_layout",
]
