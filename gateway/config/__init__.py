"""Configuration: vehicle profiles (TOML) and unit handling, validated on load."""

from gateway.config.errors import ConfigError
from gateway.config.profile import (
    BusSpec,
    MessageSpec,
    Profile,
    SignalMapping,
    load_profile,
)

__all__ = ["BusSpec", "ConfigError", "MessageSpec", "Profile", "SignalMapping", "load_profile"]
