"""ev-gateway: companion gateway for micro electric cars.

Data flows one way through the package: ``can`` (frames in) -> ``decode``
(DBC -> canonical signals) -> ``state`` (latest value, timestamp, validity)
-> consumers. ``app`` wires the stages; no stage imports another stage's
internals.
"""

__version__ = "0.1.0"
