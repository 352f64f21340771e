"""Wiring: profile -> decode tables -> sources -> decoders -> state -> safety, insights -> MQTT.

This is the only package that knows every stage. Each stage gets exactly what
it needs (a queue, a clock, counters), so stages stay testable on their own.
One module per stage's wiring; :class:`Gateway` composes them.
"""

from gateway.app.commands import Commands
from gateway.app.gateway import Gateway, run_until, stop_event
from gateway.app.pipeline import QUEUE_FRAMES, Pipeline, cancel_all
from gateway.app.publishing import EXPIRE_EVERY, Publishing
from gateway.app.safety import Safety

__all__ = ["EXPIRE_EVERY", "QUEUE_FRAMES", "Commands", "Gateway", "Pipeline", "Publishing",
           "Safety", "cancel_all", "run_until", "stop_event"]
