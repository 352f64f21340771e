"""Remote commands: actions, setpoints and the service on the command topic."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.app.pipeline import Pipeline, cancel_all
from gateway.app.publishing import EXPIRE_EVERY, Publishing
from gateway.app.safety import Safety
from gateway.clock import Clock
from gateway.commands.actions import build_actions
from gateway.commands.keys import KeyFile, gateway_key, load_private_key, store_gateway_key
from gateway.commands.outcome import Action, Confirmations
from gateway.commands.replay import ReplayCache, ReplayCacheError
from gateway.commands.service import CommandService, Incoming
from gateway.commands.service import Policy as CommandPolicy
from gateway.commands.setpoint import Setpoint
from gateway.config import ConfigError
from gateway.config.settings import Settings

log = logging.getLogger("gateway")

@dataclass
class Commands:
    """Remote commands: the actions the profile supports, their setpoints, and (with
    an authorized-keys file) the service answering the command topic."""

    actions: dict[str, Action]
    setpoints: list[Setpoint]
    service: CommandService | None = None
    new_key: tuple[Path, Ed25519PrivateKey] | None = None
    """A gateway key made at build time, written to disk at start."""
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    def build(cls, pipeline: Pipeline, safety: Safety, state_dir: Path | None) -> Commands:
        """The profile's commands (ConfigError for names its DBCs lack); no service yet."""
        confirmations = Confirmations(pipeline.clock)
        actions, setpoints = build_actions(
            pipeline.profile, safety.guard, pipeline.store, pipeline.clock, confirmations,
            safety.monitor, safety.speed_cap, state_dir)
        pipeline.listeners.append(confirmations.on_batch)
        return cls(actions, setpoints)

    def serve(self, pipeline: Pipeline, safety: Safety, publishing: Publishing,
              settings: Settings) -> None:
        """Answer the command topic; call before ``publishing.launch()``. Does nothing
        without an authorized-keys file (commands are off by default)."""
        cfg = settings.commands
        if cfg.keys is None:
            log.info("commands: off (no authorized keys file configured)")
            return
        try:
            signer, new = gateway_key(settings.gateway_key_path)
            if new:
                self.new_key = (settings.gateway_key_path, signer)
        except (ValueError, OSError) as exc:
            raise ConfigError(settings.file or "<settings>", str(exc),
                              key="commands.gateway_key") from None
        policy = CommandPolicy(cfg.clock_skew_s, cfg.max_lifetime_s, cfg.rate_per_minute,
                               cfg.burst, cfg.retention_h * 3600.0)
        durable = publishing.durable
        service = CommandService(
            publishing.topics, KeyFile(cfg.keys), signer,
            ReplayCache(settings.state_dir / "commands.sqlite"), self.actions,
            safety.monitor.evaluate, publishing.link, pipeline.clock, pipeline.counters,
            pipeline.rlog, policy, audit=lambda data: durable.event("command", data))

        def submit(payload: bytes, retain: bool, response: str | None,
                   correlation: bytes | None) -> None:
            service.submit(Incoming(payload, retain, response, correlation))

        publishing.link.on_command = submit
        self.service = service

    async def start(self, clock: Clock, live: bool) -> None:
        """Open the replay cache and start answering; keep setpoints on live buses."""
        if self.new_key is not None:
            path, key = self.new_key
            self.new_key = None
            try:
                store_gateway_key(path, key)
            except FileExistsError:
                # Another process made the key since build: the service must sign with it.
                if self.service is not None:
                    self.service.use_signer(load_private_key(path))
                log.warning("commands: %s appeared while starting; using it", path)
        if self.service is not None:
            await self.service.cache.open(clock.time())
            self.tasks.append(asyncio.create_task(self.service.run(), name="commands"))
            self.tasks.append(asyncio.create_task(self._prune(self.service, clock),
                                                  name="commands-prune"))
        if live:
            self.tasks += [asyncio.create_task(sp.loop(), name=f"setpoint-{sp.spec.name}")
                           for sp in self.setpoints]

    @staticmethod
    async def _prune(service: CommandService, clock: Clock) -> None:
        while True:
            with contextlib.suppress(ReplayCacheError):  # the service reports cache errors
                await service.cache.prune(clock.time(), service.policy.retention_s,
                                          service.policy.skew_s)
            await clock.sleep(EXPIRE_EVERY)

    async def stop(self) -> None:
        """Stop answering, cancel running commands and close the replay cache."""
        await cancel_all(self.tasks)
        self.tasks.clear()
        if self.service is not None:
            await self.service.stop()
            await self.service.cache.close()
