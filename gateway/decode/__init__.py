"""DBC decoding: from CAN frames to canonical signal values in the state store."""

from gateway.decode.dbc import load_dbc
from gateway.decode.decoder import Decoder
from gateway.decode.plan import BusPlan, MessagePlan, build_plans, frame_key

__all__ = ["BusPlan", "Decoder", "MessagePlan", "build_plans", "frame_key", "load_dbc"]
