"""The per-frame path: classify, decode (only when the payload is new), write state.

Cost control, in order of effect:

1. Frames whose ID the profile does not map are counted and dropped before
   any decoding.
2. Each mapped ID keeps a small cache from payload bytes to the resolved
   state updates. Cyclic frames repeat their payload most of the time (a
   parked car, slow temperatures, multiplexed cell pages), and a cache hit
   costs a dict lookup instead of a cantools decode. A hit still refreshes the
   timestamps: the value was re-confirmed by a new frame.
3. cantools decodes raw integers (no scaling, no choice objects), and the
   state keeps them raw, one shared sample per frame (or multiplexer page):
   recording a frame is two stores, and scaling, unit conversion and enum
   lookup happen when a value is read (see gateway.state.store).

Bad input is counted per reason under ``decode.<reason>`` (and, for a mapped
message that fails a receive check, ``rx.<message>.<reason>``) and logged
once per interval per reason, never raised. Receive checks (counter,
checksum: gateway.safety.receive) run before a frame reaches the state.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, cast

import can

from gateway.decode.plan import EXTENDED, BusPlan, MessagePlan, frame_key
from gateway.health import Counters, RateLimitedLog
from gateway.state import Sample

log = logging.getLogger(__name__)

CACHE_ENTRIES = 32
"""Payloads remembered per ID: enough for every page of a multiplexed message."""

CacheEntry = tuple[dict[str, Any], tuple[Sample, ...]]


class Decoder:
    """Decodes batches of frames from one bus into the state store."""

    def __init__(self, plan: BusPlan, counters: Counters, rlog: RateLimitedLog) -> None:
        self.bus = plan.spec.name
        self._mapped = plan.mapped
        self._known = plan.messages
        self._counters = counters
        self._rlog = rlog
        self._frames_key = f"can.{self.bus}.frames"

    def process(self, batch: Sequence[can.Message]) -> None:
        """Decode every frame of ``batch`` into state. Never raises for bad frames."""
        self._counters.inc(self._frames_key, len(batch))
        mapped = self._mapped
        extended = EXTENDED
        for msg in batch:
            if msg.is_error_frame or msg.is_remote_frame:
                self._reject(msg, "error_frame" if msg.is_error_frame else "remote_frame")
                continue
            aid = msg.arbitration_id
            plan = mapped.get(aid | extended if msg.is_extended_id else aid)
            if plan is None:
                self._unmapped(msg)
                continue
            data = bytes(msg.data)
            entry = plan.cache.get(data)
            check = plan.check
            if entry is None:
                if len(data) != plan.length:
                    self._wrong_length(plan, msg, data)
                    continue
                # Only new payloads are verified: the cache holds payloads that passed.
                if check is not None and not check.checksum_ok(data):
                    self._failed(plan, msg, "bad_checksum")
                    continue
                entry = self._decode(plan, data, msg)
                if entry is None:
                    continue
            ts = msg.timestamp
            values, pages = entry
            if check is not None and not check.accept(values, ts):
                self._failed(plan, msg, "bad_counter", reject=False)
                continue
            sample = plan.sample
            sample.timestamp = ts
            sample.values = values
            for sample in pages:
                sample.timestamp = ts
                sample.values = values

    def _decode(self, plan: MessagePlan, data: bytes, msg: can.Message) -> CacheEntry | None:
        try:
            values = cast(
                "dict[str, Any]",
                plan.message.decode(
                    data, decode_choices=False, scaling=False, decode_containers=False
                ),
            )
        except Exception as exc:  # cantools/bitstruct raise assorted types for bad payloads
            self._invalidate(plan, msg.timestamp)
            self._reject(msg, "undecodable", f"{plan.name}: {exc}")
            return None
        entry = (values, plan.page_samples(values))
        cache = plan.cache
        if len(cache) >= CACHE_ENTRIES:
            # Payloads with a rolling counter never repeat; a full cache is simply reset.
            cache.clear()
            self._counters.inc("decode.cache_resets")
        cache[data] = entry
        self._counters.inc("decode.decoded")
        return entry

    def _unmapped(self, msg: can.Message) -> None:
        if frame_key(msg.arbitration_id, msg.is_extended_id) in self._known:
            # In the DBC but not in the profile: expected traffic, counted only.
            self._counters.inc("decode.unmapped")
            return
        self._reject(msg, "unknown_id")

    def _wrong_length(self, plan: MessagePlan, msg: can.Message, data: bytes) -> None:
        self._failed(plan, msg, "wrong_dlc", f"{len(data)} bytes, expected {plan.length}")

    def _failed(self, plan: MessagePlan, msg: can.Message, reason: str, detail: str = "",
                reject: bool = True) -> None:
        """A frame of a mapped message failed a receive check: it is not consumed."""
        self._invalidate(plan, msg.timestamp)
        if reject and plan.check is not None:
            plan.check.reject(reason, msg.timestamp)
        self._counters.inc(f"rx.{plan.name}.{reason}")
        self._reject(msg, reason, f"{plan.name}: {detail}" if detail else plan.name)

    @staticmethod
    def _invalidate(plan: MessagePlan, ts: float) -> None:
        # A frame we cannot trust makes its signals invalid rather than leaving the
        # previous value looking current.
        for sample in plan.all_samples():
            sample.values = None
            sample.timestamp = ts

    def _reject(self, msg: can.Message, reason: str, detail: str = "") -> None:
        self._counters.inc(f"decode.{reason}")
        self._counters.inc(f"decode.{self.bus}.{reason}")
        text = f"bus {self.bus}: {reason.replace('_', ' ')}: ID {_fmt_id(msg)}"
        if detail:
            text += f" ({detail})"
        self._rlog.warning(f"{self.bus}:{reason}", text)


def _fmt_id(msg: can.Message) -> str:
    width = 8 if msg.is_extended_id else 3
    return f"0x{msg.arbitration_id:0{width}X}"

