"""Neighbouring readings of the stored activations: modularity curves (class separation per
block, from exact k-NN graphs) and diffused redundancy (ridge probes on channel subsets, from
joint moments)."""

from rba_store.readings.modularity import (
    MODULARITY,
    ModularityCurve,
    modularity,
    modularity_spans,
    run_modularity,
)

__all__ = [
    "MODULARITY",
    "ModularityCurve",
    "modularity",
    "modularity_spans",
    "run_modularity",
]
