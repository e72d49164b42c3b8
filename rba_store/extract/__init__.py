"""From a model and a data set to the store: models, data sources, capture of the residual
stream, the embedded default, and the resumable, parallel extractor."""

from rba_store.extract.extractor import ExtractionResult, run_extraction, shard_buffer
from rba_store.extract.plan import ExtractionPlan, ExtractOptions, plan_extraction

__all__ = [
    "ExtractOptions",
    "ExtractionPlan",
    "ExtractionResult",
    "plan_extraction",
    "run_extraction",
    "shard_buffer",
]
