"""Vehicle state: the latest value of every canonical signal, with unit, source
timestamp, validity and staleness."""

from gateway.state.catalog import CATALOG, CatalogEntry, lookup
from gateway.state.store import Sample, SignalState, SignalView, StateStore

__all__ = [
    "CATALOG", "CatalogEntry", "Sample", "SignalState", "SignalView", "StateStore", "lookup",
]
