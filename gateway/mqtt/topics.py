"""The MQTT topic contract: ``evgw/v1/{vehicle_id}/...``.

Every topic the gateway publishes is built here, so the contract lives in one
place (docs/asyncapi.yaml documents it, and the tests check the two agree).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.state.catalog import Group

PREFIX = "evgw/v1"
GROUPS: tuple[Group, ...] = (
    "battery", "motion", "location", "body", "charging", "health", "safety",
)
_VEHICLE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TOPIC_PREFIX = re.compile(r"^[^/+#\x00]+(/[^/+#\x00]+)*$")


def valid_vehicle_id(vehicle_id: str) -> bool:
    """True when ``vehicle_id`` can be one topic level (no wildcards, separators or spaces)."""
    return bool(_VEHICLE_ID.fullmatch(vehicle_id))


def valid_topic_prefix(prefix: str) -> bool:
    """True when ``prefix`` is one or more plain topic levels (no wildcards, no empty levels)."""
    return bool(_TOPIC_PREFIX.fullmatch(prefix))


@dataclass(frozen=True)
class Topics:
    """The topics of one vehicle."""

    vehicle_id: str

    def __post_init__(self) -> None:
        if not valid_vehicle_id(self.vehicle_id):
            raise ValueError(
                f"vehicle id {self.vehicle_id!r}: use 1-64 letters, digits, '_', '-' or '.'"
            )

    @property
    def base(self) -> str:
        """``evgw/v1/{vehicle_id}``."""
        return f"{PREFIX}/{self.vehicle_id}"

    @property
    def status(self) -> str:
        """Retained birth / will."""
        return f"{self.base}/status"

    @property
    def telemetry(self) -> str:
        """Live, change-driven samples (QoS 0)."""
        return f"{self.base}/telemetry"

    @property
    def backfill(self) -> str:
        """Telemetry recorded while offline (QoS 1, through the outbox)."""
        return f"{self.base}/backfill"

    @property
    def location(self) -> str:
        """Live position objects (QoS 0), by the distance/time policy."""
        return f"{self.base}/location"

    @property
    def health(self) -> str:
        """The gateway's own health report (QoS 0, every ``[health] interval_s``)."""
        return f"{self.base}/health"

    @property
    def last_trip(self) -> str:
        """Retained: the last finished trip."""
        return f"{self.base}/trips/last"

    @property
    def last_charge(self) -> str:
        """Retained: the last finished charging session."""
        return f"{self.base}/charging/last"

    def state(self, group: str) -> str:
        """Retained last-known values of one group."""
        return f"{self.base}/state/{group}"

    @property
    def alerts(self) -> str:
        """Alert raise/clear transitions (QoS 1, durable)."""
        return f"{self.base}/alerts"

    @property
    def alerts_active(self) -> str:
        """Retained set of active alerts."""
        return f"{self.base}/alerts/active"

    @property
    def events(self) -> str:
        """Things that happened (QoS 1, durable)."""
        return f"{self.base}/events"

    @property
    def command_request(self) -> str:
        """Where signed commands arrive (docs/commands.md)."""
        return f"{self.base}/cmd/req"

    def command_result(self, command_id: str) -> str:
        """Where the results of one command are published (for MQTT 3.1.1 clients)."""
        return f"{self.base}/cmd/res/{command_id}"

    def valid_response_topic(self, topic: str) -> bool:
        """Whether the gateway may answer on a requester's MQTT 5 response topic.

        Plain topic levels only, and nothing in the ``evgw/v1`` tree but this
        vehicle's ``cmd/res/``: a requester must not make the gateway publish
        over another vehicle's topics or its own telemetry.
        """
        if not valid_topic_prefix(topic) or len(topic.encode()) > 1024:
            return False
        return not topic.startswith(f"{PREFIX}/") or topic.startswith(f"{self.base}/cmd/res/")

    def owned_retained(self) -> list[str]:
        """Retained topics only this gateway may publish; anything else there is foreign."""
        return [self.status, self.alerts_active, self.last_trip, self.last_charge,
                *(self.state(g) for g in GROUPS)]
