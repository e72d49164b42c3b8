"""The streaming normal-equation solver: accumulate XᵀX and XᵀY chunk by chunk in float64 on
NumPy or CuPy, locally or on a Dask cluster, and solve for the map T that replaces a span."""

from rba_store.solve.fit import FitOptions, SpanFit, export_safetensors, fit_spans, load_fit
from rba_store.solve.normal_eq import NormalEquations, Solution, solve

__all__ = [
    "FitOptions",
    "NormalEquations",
    "Solution",
    "SpanFit",
    "export_safetensors",
    "fit_spans",
    "load_fit",
    "solve",
]
