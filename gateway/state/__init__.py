"""Vehicle state: the latest value of every canonical signal, with unit, source
timestamp, validity and staleness."""

from gateway.state.catalog import CATALOG, CatalogEntry, lookup
from gateway.state.store import SignalState, SignalView, StateStore

__all__ = ["CATALOG", "CatalogEntry", "SignalState", "SignalView", "StateStore", "lookup"]
