"""The smaller network: surgery (spans replaced by fitted maps or the identity), rebuilding a
store's model and test data, approximated models on disk (recipes), evaluation and sweeps."""

from rba_store.approx.surgery import (
    LinearReplacement,
    SpanMap,
    count_flops,
    count_parameters,
    images_per_second,
    replace_spans,
)

__all__ = [
    "LinearReplacement",
    "SpanMap",
    "count_flops",
    "count_parameters",
    "images_per_second",
    "replace_spans",
]
