"""Remote commands: authenticate, deduplicate, check, carry out, answer.

Each message on ``evgw/v1/{vehicle}/cmd/req`` passes these steps in order;
the first that fails answers with its reason and nothing reaches the bus:

1. not retained (``retained``), a well-formed envelope (``malformed``);
2. a known key (``unknown_key``) whose signature verifies
   (``bad_signature``), for this vehicle (``wrong_vehicle``);
3. the replay cache: the same envelope again gets the stored result, a
   different envelope reusing the id is ``replayed``;
4. the key's rate limit (``rate_limited``);
5. validity: ``expired`` (past ``expires_at`` + skew), ``issued_in_future``,
   ``bad_validity`` (longer than ``max_lifetime_s``), ``predates_replay_cache``;
6. the key's validity (``key_expired``), the role (``role_not_allowed``),
   the vehicle (``not_supported``), the arguments (``bad_arguments``,
   ``controller_unavailable``);
7. interlocks (``vehicle_moving``, ``motion_unknown``).

Then the id is recorded, ``accepted`` is answered and the command runs;
its final result follows. Answers go to the MQTT 5 response topic (with
the correlation data) and, once the signature verified, to ``cmd/res/{id}``,
signed with the gateway key. Each names the request it answers (``req``, a
digest of the payload bytes), so a copy of a command with a forged signature
cannot pass its answer off as the real one's. Results from step 4 on are
stored, so a retransmission gets the same one.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.clock import Clock
from gateway.commands import envelope as env
from gateway.commands.keys import AuthorizedKey, KeyFile
from gateway.commands.outcome import STATIONARY_ONLY, Action, Outcome, motion_refusal, rejected
from gateway.commands.replay import Record, ReplayCache, ReplayCacheError
from gateway.health import Counters, RateLimitedLog
from gateway.mqtt.topics import Topics
from gateway.queues import BatchQueue, Overflow
from gateway.safety.verdicts import Verdicts

log = logging.getLogger("gateway.commands")

UNSTORED_ANSWER_RATE = 5.0
"""Answers per second to junk, forgeries, replays and duplicates (anything not a fresh,
authenticated command); more are counted, not sent, so replaying captured traffic cannot
turn the gateway into an amplifier or crowd out real commands."""


@dataclass(frozen=True)
class Incoming:
    """A message that arrived on the command topic."""

    payload: bytes
    retain: bool = False
    response_topic: str | None = None
    correlation: bytes | None = None


class ResultSink(Protocol):
    """Where signed results go (the MQTT link)."""

    async def publish_result(self, topics: list[str], payload: bytes,
                             correlation: bytes | None) -> bool:
        """Publish ``payload`` (QoS 1, not retained) to each topic."""
        ...


@dataclass(frozen=True)
class Policy:
    """Tunables of the command service (settings ``[commands]``)."""

    skew_s: float = 10.0
    max_lifetime_s: float = 120.0
    rate_per_minute: float = 20.0
    burst: int = 5
    retention_s: float = 86400.0
    queue: int = 32


class _Bucket:
    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate, self.burst, self.tokens, self.at = rate, float(burst), float(burst), now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


@dataclass
class _Context:
    """One command while it is being handled."""

    msg: Incoming
    id: str | None = None
    cmd: str | None = None
    key: AuthorizedKey | None = None
    command: env.Command | None = None
    digest: bytes = b""


class CommandService:
    """Handles the command topic of one vehicle; see the module docstring."""

    def __init__(self, topics: Topics, keys: KeyFile, signer: Ed25519PrivateKey,
                 cache: ReplayCache, actions: dict[str, Action],
                 verdicts: Callable[[], Verdicts], sink: ResultSink, clock: Clock,
                 counters: Counters, rlog: RateLimitedLog, policy: Policy | None = None,
                 audit: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.topics = topics
        self.keys = keys
        self.use_signer(signer)
        self.cache = cache
        self.actions = actions
        self._verdicts = verdicts
        self.sink = sink
        self._clock = clock
        self._counters = counters
        self._rlog = rlog
        self.policy = policy or Policy()
        self.audit = audit
        self.queue: BatchQueue[Incoming] = BatchQueue(
            "commands", self.policy.queue, Overflow.DROP_OLDEST, counters)
        self._buckets: dict[str, _Bucket] = {}
        self._answers = _Bucket(UNSTORED_ANSWER_RATE, int(UNSTORED_ANSWER_RATE),
                                clock.monotonic())
        self.running: set[asyncio.Task[None]] = set()

    # ---- intake ---------------------------------------------------------------------


    def use_signer(self, signer: Ed25519PrivateKey) -> None:
        """Sign results with ``signer`` (the gateway key; replaced only before serving)."""
        self._signer = signer
        self.kid = env.key_id(signer.public_key())
    def submit(self, msg: Incoming) -> None:
        """Queue a message from the command topic (never blocks; when full, the oldest
        waiting message is dropped: it is the likeliest to expire first)."""
        self._counters.inc("commands.received")
        if len(msg.payload) > env.MAX_PAYLOAD:
            # Refused before queueing, so the bounded queue bounds memory too.
            self._counters.inc("commands.rejected.too_large")
            self._rlog.warning("commands.too_large", f"commands: dropped a {len(msg.payload)}"
                               f"-byte message (at most {env.MAX_PAYLOAD})")
            return
        self.queue.put_nowait([msg])

    async def run(self) -> None:
        """Handle queued commands one by one until cancelled (execution runs beside)."""
        await self._finish_interrupted()
        while (batch := await self.queue.get()) is not None:
            for msg in batch:
                try:
                    await self.handle(msg)
                except Exception as exc:  # a bug must cost one message, not the service
                    self._counters.inc("commands.internal_error")
                    self._rlog.error("commands.internal_error",
                                     f"commands: handling a message failed: {exc!r}")

    async def stop(self) -> None:
        """Cancel commands still running; the next start reports them as interrupted."""
        tasks = list(self.running)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def handle(self, msg: Incoming) -> None:
        """Take one message through every step; answer it."""
        ctx = _Context(msg)
        try:
            outcome = await self._admit(ctx)
        except ReplayCacheError as exc:
            self._rlog.error("commands.cache", f"commands: {exc}; refusing commands")
            outcome = rejected("replay_cache_unavailable")
        if outcome is not None:
            await self._answer(ctx, outcome)

    # ---- the steps --------------------------------------------------------------------

    async def _admit(self, ctx: _Context) -> Outcome | None:
        """Steps 1-7; None when the command was accepted and started (or deduplicated)."""
        msg = ctx.msg
        try:
            signed = env.unwrap(msg.payload)
            command = env.parse_command(signed.body)
        except env.Malformed as exc:
            return rejected("retained") if msg.retain else rejected("malformed", error=str(exc))
        ctx.id, ctx.cmd = command.id, command.cmd
        if msg.retain:
            # A retained command would run again on every reconnect: never act on one.
            return rejected("retained")
        key = self.keys.current().lookup(command.kid)
        if key is None:
            return rejected("unknown_key", kid=command.kid)
        if not env.verify(key.key, env.COMMAND_CONTEXT, signed):
            return rejected("bad_signature")
        ctx.key, ctx.command = key, command
        if command.vehicle != self.topics.vehicle_id:
            return rejected("wrong_vehicle", vehicle=command.vehicle)
        ctx.digest = hashlib.sha256(signed.body).digest()
        known = await self.cache.lookup(command.id)
        if known is not None:
            return await self._duplicate(ctx, known)
        outcome = None
        if not self._bucket(key).take(self._clock.monotonic()):
            # Stored like any answer: a refused envelope must not run when re-sent later.
            outcome = rejected("rate_limited")
        outcome = outcome or self._validity(command) or self._permitted(key, command)
        if outcome is None and await self.cache.full():
            outcome = rejected("replay_cache_full")
        if outcome is not None:
            await self._store_final(ctx, outcome)
            return None
        accepted = self._sign(self._result(ctx, Outcome("accepted")))
        if not await self.cache.record(self._record(ctx, accepted, False), command.expires_at_ms,
                                       self._clock.time()):
            return rejected("replayed")  # cannot happen: commands are admitted one at a time
        # The id is on disk: the frame may go out while "accepted" is on its way.
        task = asyncio.create_task(self._execute(ctx), name=f"command-{command.id[:8]}")
        self.running.add(task)
        task.add_done_callback(self.running.discard)
        await self._deliver(ctx, accepted)
        return None

    async def _duplicate(self, ctx: _Context, known: Record) -> Outcome | None:
        if known.digest != ctx.digest:
            return rejected("replayed")
        self._counters.inc("commands.duplicate")
        self._rlog.warning(f"commands.duplicate.{known.kid}",
                           f"commands: {ctx.id} received again; answering with its result")
        if self._answers.take(self._clock.monotonic()):
            await self._deliver(ctx, known.result)
        else:
            self._counters.inc("commands.answers_suppressed")
        return None

    def _bucket(self, key: AuthorizedKey) -> _Bucket:
        bucket = self._buckets.get(key.kid)
        if bucket is None:
            bucket = self._buckets[key.kid] = _Bucket(self.policy.rate_per_minute / 60.0,
                                                      self.policy.burst, self._clock.monotonic())
        return bucket

    def _validity(self, command: env.Command) -> Outcome | None:
        now_ms = self._clock.time() * 1000.0
        skew_ms = self.policy.skew_s * 1000.0
        lifetime = command.expires_at_ms - command.issued_at_ms
        if lifetime <= 0 or lifetime > self.policy.max_lifetime_s * 1000.0:
            return rejected("bad_validity", max_lifetime_s=self.policy.max_lifetime_s)
        if now_ms > command.expires_at_ms + skew_ms:
            return Outcome("expired", "expired")
        if command.issued_at_ms > now_ms + skew_ms:
            return rejected("issued_in_future", skew_s=self.policy.skew_s)
        if command.issued_at_ms < self.cache.created * 1000.0:
            return rejected("predates_replay_cache")
        return None

    def _permitted(self, key: AuthorizedKey, command: env.Command) -> Outcome | None:
        if key.expired(self._clock.time()):
            return rejected("key_expired")
        if not self.keys.current().allows(key, command.cmd):
            return rejected("role_not_allowed", role=key.role)
        action = self.actions.get(command.cmd)
        if action is None:
            return rejected("not_supported")
        return action.check(command.args) or self._interlock(command)()

    def _interlock(self, command: env.Command) -> Callable[[], Outcome | None]:
        """What must still hold right before each frame: not expired, and for some
        commands a proven standstill (on fresh verdicts, evaluated now)."""
        def check() -> Outcome | None:
            if self._clock.time() * 1000.0 > command.expires_at_ms + self.policy.skew_s * 1000:
                return Outcome("expired", "expired")
            if command.cmd in STATIONARY_ONLY:
                return motion_refusal(self._verdicts())
            return None
        return check

    async def _execute(self, ctx: _Context) -> None:
        assert ctx.command is not None and ctx.key is not None
        command = ctx.command
        try:
            outcome = await self.actions[command.cmd].run(command.args, self._interlock(command))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must answer, not leave the app waiting
            self._rlog.error(f"commands.error.{command.cmd}",
                             f"commands: {command.cmd} {command.id} failed: {exc!r}")
            outcome = Outcome("failed", "internal_error")
        try:
            await self._store_final(ctx, outcome, update=True)
        except Exception as exc:  # the next start answers it "interrupted"
            self._rlog.error("commands.cache", f"commands: storing the result of "
                             f"{command.id} failed: {exc!r}")

    async def _store_final(self, ctx: _Context, outcome: Outcome, update: bool = False
                           ) -> None:
        assert ctx.command is not None and ctx.id is not None
        payload = self._sign(self._result(ctx, outcome))
        self._account(ctx, outcome)
        if update:
            # The id was recorded before anything was sent; a final result lost in a
            # crash is answered "interrupted" at the next start.
            await asyncio.gather(self._deliver(ctx, payload),
                                 self.cache.update(ctx.id, payload, True))
            return
        await self.cache.record(self._record(ctx, payload, True), ctx.command.expires_at_ms,
                                self._clock.time())
        await self._deliver(ctx, payload)

    async def _finish_interrupted(self) -> None:
        """Answer commands a previous run accepted but never finished."""
        for record in await self.cache.unfinished():
            try:  # the stored "accepted" names the command and the request it answered
                accepted = env.open_result(record.result, None)
            except env.Malformed:
                accepted = None
            result = env.Result(self.topics.vehicle_id, record.id,
                                accepted.cmd if accepted else None, "failed", "interrupted",
                                self._now_ms(), self.kid, record.kid, None,
                                accepted.req if accepted else None)
            await self.cache.update(record.id, self._sign(result), True)
            self._counters.inc("commands.failed.interrupted")
            log.warning("commands: %s was interrupted by a restart; answered failed", record.id)

    # ---- answers ----------------------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self._clock.time() * 1000)

    def _result(self, ctx: _Context, outcome: Outcome) -> env.Result:
        return env.Result(self.topics.vehicle_id, ctx.id, ctx.cmd, outcome.status,
                          outcome.reason, self._now_ms(), self.kid,
                          ctx.key.kid if ctx.key else None, outcome.detail,
                          env.request_digest(ctx.msg.payload))

    def _sign(self, result: env.Result) -> bytes:
        return env.sign_result(result, self._signer)

    def _record(self, ctx: _Context, payload: bytes, final: bool) -> Record:
        assert ctx.id is not None and ctx.key is not None
        return Record(ctx.id, ctx.digest, ctx.key.kid, final, payload)

    async def _answer(self, ctx: _Context, outcome: Outcome) -> None:
        """An answer to a message that was not stored (failed steps 1-4)."""
        self._account(ctx, outcome)
        if not self._answers.take(self._clock.monotonic()):
            self._counters.inc("commands.answers_suppressed")
            return
        await self._deliver(ctx, self._sign(self._result(ctx, outcome)))

    async def _deliver(self, ctx: _Context, payload: bytes) -> None:
        # Only a verified sender's command id names a result topic: anyone can copy an id
        # off cmd/req, and a forged copy must not answer in the real command's place.
        topics = [self.topics.command_result(ctx.id)] if ctx.id and ctx.key else []
        response = ctx.msg.response_topic
        if response is not None and response not in topics:
            if self.topics.valid_response_topic(response):
                topics.append(response)
            else:
                self._counters.inc("commands.bad_response_topic")
                self._rlog.warning("commands.response_topic",
                                   f"commands: not answering on response topic {response!r}")
        if not topics:
            self._counters.inc("commands.unanswerable")
            return
        if not await self.sink.publish_result(topics, payload, ctx.msg.correlation):
            self._counters.inc("commands.answers_lost")

    def _account(self, ctx: _Context, outcome: Outcome) -> None:
        reason = outcome.reason or "ok"
        self._counters.inc(f"commands.{outcome.status}")
        if outcome.status != "succeeded":
            self._counters.inc(f"commands.{outcome.status}.{reason}")
        who = f"key {ctx.key.name} ({ctx.key.role})" if ctx.key else "an unauthenticated sender"
        text = (f"commands: {ctx.cmd or 'a command'} {ctx.id or ''} from {who}: "
                f"{outcome.status}{' (' + reason + ')' if outcome.reason else ''}")
        if ctx.key is not None and outcome.status == "succeeded":
            log.info("%s", text)
        else:
            self._rlog.warning(f"commands.{outcome.status}.{reason}", text)
        if ctx.key is not None and self.audit is not None:
            self.audit({"id": ctx.id, "cmd": ctx.cmd, "key": ctx.key.kid, "name": ctx.key.name,
                        "role": ctx.key.role, "status": outcome.status,
                        "reason": outcome.reason})
