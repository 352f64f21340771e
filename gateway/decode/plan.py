"""Resolving a profile against its DBC files into decode tables.

Done once at start-up. Everything that can be worked out before the first
frame is: which IDs are mapped, the expected length of each, one affine map
per signal that folds DBC scaling, unit conversion and the profile's own
scale together, enum tables, "not available" raw values and staleness
windows. The per-frame code then only looks things up.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cantools.database.can import Database, Message, Signal

from gateway.config.errors import ConfigError
from gateway.config.profile import BusSpec, Profile, SignalMapping
from gateway.config.units import conversion, normalise
from gateway.decode.dbc import load_dbc
from gateway.state import Sample, SignalState, StateStore, lookup
from gateway.state.store import Value

EXTENDED = 0x8000_0000
"""Added to a 29-bit ID to key it apart from an 11-bit ID with the same number."""

def frame_key(arbitration_id: int, is_extended: bool) -> int:
    """Table key of a frame: its ID, with bit 31 set for 29-bit IDs."""
    return arbitration_id | EXTENDED if is_extended else arbitration_id


@dataclass(eq=False)
class SignalDecode:
    """How one DBC signal becomes one canonical value (from the *raw* integer).

    Its :meth:`convert` is installed as the state slot's converter, so it runs
    when a value is read, not for every frame.
    """

    dbc_signal: str
    slot: SignalState
    boolean: bool
    factor: float
    offset: float
    ndigits: int | None
    integral: bool
    enum: dict[int, Value] | None
    sna: frozenset[int]
    special: dict[int, Value] | None = None
    note: str = ""

    def convert(self, raw: Any) -> tuple[Value | None, bool]:
        """(value, valid) for a raw decoded number."""
        if raw in self.sna:
            return None, False
        if self.enum is not None:
            if not isinstance(raw, int) or raw not in self.enum:
                return None, False
            return self.enum[raw], True
        if self.boolean:
            return raw != 0, True
        if self.special is not None and raw in self.special:
            return self.special[raw], True
        value = raw * self.factor + self.offset
        if self.integral:
            return int(value), True
        if self.ndigits is not None:
            value = round(value, self.ndigits)
        return value, True


class FrameCheck(Protocol):
    """A receive check (gateway.safety.receive) the decoder consults per frame."""

    def checksum_ok(self, data: bytes) -> bool:
        """True when a new payload's checksum is right."""
        ...

    def accept(self, values: dict[str, Any], ts: float) -> bool:
        """True when the frame (with these raw values) may be consumed."""
        ...

    def reject(self, reason: str, ts: float) -> None:
        """Record a failed frame."""
        ...


@dataclass(eq=False)
class MessagePlan:
    """Everything the decoder needs for one mapped CAN ID."""

    bus: str
    name: str
    key: int
    length: int
    message: Message
    signals: dict[str, list[SignalDecode]]
    cycle_s: float | None
    sample: Sample = field(default_factory=Sample)
    """Where the frame's non-multiplexed signals live."""
    mux_signal: str | None = None
    pages: dict[int, tuple[Sample, ...]] = field(default_factory=dict)
    """Multiplexer value -> the samples its page updates (besides ``sample``)."""
    page_groups: dict[frozenset[int], Sample] = field(default_factory=dict)
    """One sample per distinct set of pages that signals are carried on."""
    cache: dict[bytes, tuple[dict[str, Any], tuple[Sample, ...]]] = field(default_factory=dict)
    """Payload -> (raw values, page samples): a repeated payload needs no decode."""
    check: FrameCheck | None = None
    """Receive check (counter, checksum) the profile declares for this message."""

    def page_samples(self, values: dict[str, Any]) -> tuple[Sample, ...]:
        """The page samples a decoded frame updates besides ``sample`` (none unless muxed)."""
        if self.mux_signal is None:
            return ()
        return self.pages.get(values.get(self.mux_signal, -1), ())

    def all_samples(self) -> list[Sample]:
        """Every sample of this message (to invalidate them together)."""
        return [self.sample, *self.page_groups.values()]

    def stale_window(self) -> float | None:
        """How long the message may stay silent before every value it carries is stale: the
        longest staleness window of its signals (None: event-driven, never stale)."""
        return max((d.slot.stale_after for decodes in self.signals.values() for d in decodes
                    if d.slot.stale_after is not None), default=None)


@dataclass
class BusPlan:
    """Decode table of one bus: every DBC message by frame key, and the mapped ones."""

    spec: BusSpec
    databases: list[tuple[Path, Database]]
    messages: dict[int, Message]
    mapped: dict[int, MessagePlan] = field(default_factory=dict)
    by_name: dict[str, Message] = field(init=False)

    def __post_init__(self) -> None:
        self.by_name = {m.name: m for m in self.messages.values()}


def build_plans(profile: Profile, store: StateStore) -> dict[str, BusPlan]:
    """Load every DBC, resolve every mapping, register every state slot."""
    plans: dict[str, BusPlan] = {}
    for bus in profile.buses:
        dbs = [(p, load_dbc(p, bus.dbc_encoding, bus.strict)) for p in bus.dbc]
        plans[bus.name] = BusPlan(bus, dbs, index_messages(bus.name, dbs))
    for name, spec in profile.messages.items():
        bus_name = spec.bus or _only_bus(profile)
        if bus_name is None or name not in plans[bus_name].by_name:
            raise ConfigError(
                str(profile.file), "no such message in the bus's DBC files",
                line=spec.line, key=f"messages.{name}",
            )
    for mapping in profile.mappings:
        _resolve(profile, plans, mapping, store)
    return plans


def _only_bus(profile: Profile) -> str | None:
    return profile.buses[0].name if len(profile.buses) == 1 else None


def index_messages(bus: str, dbs: list[tuple[Path, Database]]) -> dict[int, Message]:
    """Every message of ``dbs`` by frame key; an ID defined twice is a ConfigError."""
    seen: dict[int, tuple[Path, Message]] = {}
    for path, db in dbs:
        for m in db.messages:
            key = frame_key(m.frame_id, m.is_extended_frame)
            if key in seen:
                other, other_msg = seen[key]
                raise ConfigError(
                    str(path),
                    f"bus {bus!r}: ID 0x{m.frame_id:X} ({m.name}) is also defined in "
                    f"{other.name} ({other_msg.name})",
                )
            seen[key] = (path, m)
    return {key: m for key, (_, m) in seen.items()}


def _fail(profile: Profile, mapping: SignalMapping, key: str, message: str) -> ConfigError:
    kind = "signal_group" if mapping.pattern else "signal"
    return ConfigError(str(profile.file), message, line=mapping.line_of(key),
                       key=f"{kind}.{key}")


def _resolve(
    profile: Profile, plans: dict[str, BusPlan], mapping: SignalMapping, store: StateStore
) -> None:
    bus_name = mapping.bus or profile.buses[0].name
    bus_plan = plans[bus_name]
    message = bus_plan.by_name.get(mapping.message)
    if message is None:
        close = difflib.get_close_matches(mapping.message, list(bus_plan.by_name), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise _fail(profile, mapping, "message",
                    f"no message {mapping.message!r} on bus {bus_name!r}{hint}")
    key = frame_key(message.frame_id, message.is_extended_frame)
    plan = bus_plan.mapped.get(key)
    if plan is None:
        plan = MessagePlan(bus_name, message.name, key, message.length, message, {},
                           _cycle_seconds(profile, message))
        plan.mux_signal = next((s.name for s in message.signals if s.is_multiplexer), None)
        bus_plan.mapped[key] = plan
    for signal, path in _expand(profile, mapping, message):
        if path in store:
            raise _fail(profile, mapping, "path", f"{path} is mapped twice")
        sd = _signal_decode(profile, mapping, message, signal, path, plan, store)
        plan.signals.setdefault(signal.name, []).append(sd)


def _cycle_seconds(profile: Profile, message: Message) -> float | None:
    spec = profile.messages.get(message.name)
    cycle_ms = spec.cycle_ms if spec and spec.cycle_ms is not None else message.cycle_time
    if cycle_ms is None:
        raise ConfigError(
            str(profile.file),
            f"message {message.name} has no GenMsgCycleTime in its DBC; set "
            f"[messages.{message.name}] cycle_ms = <period> (0 = event-driven, never stale)",
        )
    return cycle_ms / 1000.0 if cycle_ms > 0 else None


def _expand(
    profile: Profile, mapping: SignalMapping, message: Message
) -> list[tuple[Signal, str]]:
    if mapping.signal is not None:
        for s in message.signals:
            if s.name == mapping.signal:
                return [(s, mapping.path)]
        close = difflib.get_close_matches(mapping.signal, [s.name for s in message.signals])
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise _fail(profile, mapping, "signal",
                    f"message {message.name} has no signal {mapping.signal!r}{hint}")
    assert mapping.pattern is not None
    regex = re.compile(mapping.pattern)
    out = []
    for s in message.signals:
        m = regex.fullmatch(s.name)
        if m:
            text = m.group(1)
            index = str(int(text) + mapping.index_offset) if text.isdigit() else text
            out.append((s, mapping.path.replace("{n}", index)))
    if not out:
        raise _fail(profile, mapping, "pattern",
                    f"matches no signal of message {message.name}")
    return out


def _signal_decode(
    profile: Profile,
    mapping: SignalMapping,
    message: Message,
    signal: Signal,
    path: str,
    plan: MessagePlan,
    store: StateStore,
) -> SignalDecode:
    entry = lookup(path)
    if entry is None and (mapping.kind is None):
        raise _fail(profile, mapping, "path",
                    f"{path!r} is not in the signal catalog; a custom signal needs kind "
                    "(and unit, for numbers)")
    kind_name = entry.kind if entry else mapping.kind
    if entry and mapping.kind and mapping.kind != entry.kind:
        raise _fail(profile, mapping, "kind", f"{path} is a {entry.kind} in the catalog")
    if entry and mapping.unit is not None and mapping.unit != entry.unit:
        raise _fail(profile, mapping, "unit",
                    f"{path} is in {entry.unit or 'no unit'} by the catalog; to say which unit "
                    "the DBC uses, set source_unit")
    if not entry and kind_name == "number" and mapping.unit is None:
        raise _fail(profile, mapping, "unit", f"custom number {path} needs a unit (\"\" for none)")
    unit = entry.unit if entry else (mapping.unit or "")
    group = entry.group if entry else "health"

    enum: dict[int, Value] | None = mapping.enum
    if mapping.enum_from_dbc and not signal.choices:
        raise _fail(profile, mapping, "enum", f"the DBC has no value table for {signal.name}")
    if enum is None and signal.choices and (mapping.enum_from_dbc or kind_name == "string"):
        enum = {int(k): str(v) for k, v in signal.choices.items()}
    if enum is not None:
        _check_enum_types(profile, mapping, path, kind_name or "number", enum)
        for key in ("scale", "offset", "special", "source_unit"):
            if key in mapping.key_lines:
                raise _fail(profile, mapping, key, "does not apply to an enum mapping")
    elif kind_name == "bool":
        for key in ("scale", "offset", "special", "source_unit"):
            if key in mapping.key_lines:
                raise _fail(profile, mapping, key, "does not apply to a bool (raw != 0)")
    if enum is None and kind_name == "string":
        raise _fail(profile, mapping, "enum",
                    f"{path} is a string; give an enum table (the DBC has no value table "
                    f"for {signal.name})")

    factor, offset, note = 1.0, 0.0, ""
    if kind_name == "number" and enum is None:
        src = normalise(mapping.source_unit or signal.unit)
        conv = conversion(src, unit) if src else (1.0, 0.0)
        if not src and unit:
            note = f"DBC gives no unit; assumed {unit}"
        if conv is None:
            raise _fail(profile, mapping, "source_unit",
                        f"cannot convert {signal.name} from {src!r} to {unit!r}; set "
                        "source_unit to the unit the DBC really uses")
        k, c = conv
        factor = signal.scale * k * mapping.scale
        offset = (signal.offset * k + c) * mapping.scale + mapping.offset

    stale_after = _stale_after(profile, message, signal, plan.cycle_s)
    slot = store.register(SignalState(path, unit, kind_name or "number", group, stale_after,
                                      sample=_sample_for(plan, signal), key=signal.name))
    boolean = enum is None and kind_name == "bool"
    integral = (
        enum is None and not boolean and not signal.is_float
        and float(factor).is_integer() and float(offset).is_integer()
    )
    decode = SignalDecode(
        dbc_signal=signal.name, slot=slot, boolean=boolean, factor=factor, offset=offset,
        ndigits=None if signal.is_float else _ndigits(factor, offset), integral=integral, enum=enum,
        sna=mapping.sna, special=mapping.special, note=note,
    )
    slot.convert = decode.convert
    return decode


def _sample_for(plan: MessagePlan, signal: Signal) -> Sample:
    """The sample a signal lives in: the message's, or the one of its multiplexer page(s).

    Only the message's top-level multiplexer selects pages; a signal on several
    pages gets one sample that each of those pages updates.
    """
    ids = signal.multiplexer_ids
    if not ids or signal.multiplexer_signal != plan.mux_signal:
        return plan.sample
    wanted = frozenset(ids)
    sample = plan.page_groups.get(wanted)
    if sample is None:
        sample = plan.page_groups[wanted] = Sample()
        for page in ids:
            plan.pages[page] = (*plan.pages.get(page, ()), sample)
    return sample


def _check_enum_types(
    profile: Profile, mapping: SignalMapping, path: str, kind: str, enum: dict[int, Value]
) -> None:
    want: tuple[type, ...] = {"bool": (bool,), "string": (str,)}.get(kind, (int, float))
    for raw, value in enum.items():
        if not isinstance(value, want) or (kind == "number" and isinstance(value, bool)):
            raise _fail(profile, mapping, "enum",
                        f"{path} is a {kind}; raw {raw} maps to {value!r}")


def _stale_after(
    profile: Profile, message: Message, signal: Signal, cycle_s: float | None
) -> float | None:
    """Window after which the signal is stale: N cycles, times the mux pages it rotates through.

    A multiplexed signal is only carried by one page in k, so it refreshes every
    k cycles; without this factor every cell voltage would flap to stale.
    """
    if cycle_s is None:
        return None
    spec = profile.messages.get(message.name)
    cycles = spec.stale_cycles if spec and spec.stale_cycles else profile.stale_cycles
    pages = 1
    if signal.multiplexer_signal is not None:
        ids: set[int] = set()
        for s in message.signals:
            if s.multiplexer_signal == signal.multiplexer_signal and s.multiplexer_ids:
                ids.update(s.multiplexer_ids)
        pages = max(1, len(ids))
    return cycle_s * pages * cycles


def _ndigits(*numbers: float) -> int:
    """Decimal places that the resolution of an affine map justifies.

    Rounding to these removes float noise (0.1 * 33 = 3.3000000000000003)
    without inventing or losing precision the DBC provides.
    """
    places = 0
    for x in numbers:
        if float(x).is_integer():
            continue
        decimals = len(f"{abs(x):.9f}".rstrip("0").split(".")[1])
        places = max(places, 6 if decimals >= 9 else decimals)
    return places
