"""Per-key order on Service Bus (``ordering=per_key``): the key is the message's session id, and a receiver takes
the next available sessions, one message of a session at a time.

The service keeps a session's messages in send order and lets one receiver hold a session at a time (the session
lock); an abandoned message is the session's first again. So order holds if each session has at most one
unsettled message: every session slot below receives one message, waits until it is settled, then receives the
next. A slot whose session has nothing for ``SESSION_IDLE`` seconds closes it, so another consumer can take it
when more arrives; a slot without a session waits for the next available one. A receiver runs ``prefetch``
slots (the most it may hold unsettled, one message per session): one key in one worker at a time, the others
proceed.

A message without a key goes to one of ``KEYLESS_SESSIONS`` sessions chosen by a hash of its id
(``msgbus-keyless-N``), as Kafka spreads keyless records over partitions. Keyless messages promise no order, so
the slot that holds such a session hands over several of its messages at once (a quarter of ``prefetch`` per
receive, the receiver holding about ``prefetch`` in all), as a receiver without sessions would: a keyless message
never waits behind another. Its own id as its session would keep it apart from
every other too, but costs a session (on the SDK: a connection, a token and an attach) per message: 5 messages a
second per consumer against the test broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from collections.abc import Awaitable, Sequence
from typing import Any, Protocol

from azure.servicebus import NEXT_AVAILABLE_SESSION, ServiceBusMessage, ServiceBusReceivedMessage, ServiceBusReceiveMode
from azure.servicebus import exceptions as sb
from azure.servicebus.aio import ServiceBusClient, ServiceBusReceiver

from msgbus.adapter import Delivery, Endpoint, Receiver, Record
from msgbus.errors import ClosedError, InvalidMessage, MsgbusError

from . import _codec
from ._config import ServiceBusOptions
from ._errors import translated
from ._receiver import close_quietly, release_call, release_read_ahead

log = logging.getLogger("msgbus.servicebus")

SESSION_IDLE = 1.0  # seconds a session may have no next message before its slot lets it go (taking one costs more)
ACQUIRING = 4  # slots looking for a session at once, at most
ACQUIRE_WAIT = 5.0  # seconds one attempt to take the next available session waits for one
MAX_SESSION_ID = 128  # Service Bus' limit on SessionId
KEYLESS_SESSIONS = 16  # the sessions messages without a key are spread over
KEYLESS = "msgbus-keyless-"  # their names' prefix, not allowed as a key's
_SLICE = 0.1  # seconds a keyless session's receive may hold its SDK receiver while its messages are settled


def session_of(record: Record) -> str:
    """The session a record goes to: its key, or for a record without one a session chosen by a hash of its id
    (``InvalidMessage`` for a key that is empty or longer than 128 characters, Service Bus' limit)."""
    if record.key is None:
        return f"{KEYLESS}{zlib.crc32(record.id.encode()) % KEYLESS_SESSIONS}"
    session = record.key
    if not session or len(session) > MAX_SESSION_ID:
        raise InvalidMessage(
            f"servicebus ordering=per_key: the key (the session id) must be 1-{MAX_SESSION_ID} characters, "
            f"got {len(session)} for record {record.id[:80]!r}"
        )
    if session.startswith(KEYLESS):
        raise InvalidMessage(
            f"servicebus ordering=per_key: a key may not start with {KEYLESS!r} (the sessions of messages without "
            f"a key), got one for record {record.id[:80]!r}"
        )
    return session


def with_session(message: ServiceBusMessage, record: Record) -> ServiceBusMessage:
    message.session_id = session_of(record)
    return message


def session_receiver(client: ServiceBusClient, endpoint: Endpoint, session_id: str | None = None) -> ServiceBusReceiver:
    """An SDK session receiver (not attached yet) on ``endpoint``: ``session_id``, or the next available one."""
    common: dict[str, Any] = {
        "receive_mode": ServiceBusReceiveMode.PEEK_LOCK,
        "prefetch_count": 0,
        "session_id": session_id if session_id is not None else NEXT_AVAILABLE_SESSION,
        "max_wait_time": ACQUIRE_WAIT,  # for NEXT_AVAILABLE_SESSION: how long one attach waits for a session
    }
    if endpoint.subscription is not None:
        return client.get_subscription_receiver(endpoint.name, endpoint.subscription, **common)
    return client.get_queue_receiver(endpoint.name, **common)


class SessionLink(Protocol):
    """What a session receiver needs from its adapter: the settings and secrets, the client, and ``forget``."""

    options: ServiceBusOptions
    secrets: tuple[str | None, ...]

    @property
    def client(self) -> ServiceBusClient: ...

    def forget(self, receiver: Receiver) -> None: ...


class SessionReceiver(Receiver):
    """``slots`` tasks, each holding one session at a time and one unsettled message of it at most."""

    def __init__(self, adapter: SessionLink, endpoint: Endpoint, slots: int) -> None:
        self._adapter = adapter
        self.endpoint = endpoint
        self._secrets = adapter.secrets
        self._slots = slots
        self._ready: asyncio.Queue[SessionDelivery] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing: set[asyncio.Task[None]] = set()  # sessions being let go
        self._looking = 0  # slots looking for a session right now
        # Messages received and not settled yet (ready or handed out), about ``slots`` at most, as a receiver
        # without sessions holds at most its prefetch: what a consumer that dies held counts a delivery each.
        self._held = 0
        self._freed = asyncio.Event()  # set by each settlement
        self._paused = False
        self._closed = False

    async def open(self) -> None:
        """Nothing to attach before the first receive: sessions are taken as messages are asked for."""

    def _start(self) -> None:
        self._paused = False
        if not self._tasks:
            self._grow()

    def _grow(self) -> None:
        """Add slots while fewer than ``ACQUIRING`` look for a session (and fewer than ``prefetch`` run)."""
        while self._looking < ACQUIRING and len(self._tasks) < self._slots and not self._paused and not self._closed:
            self._looking += 1  # the new slot's first act is to look for a session
            task = asyncio.create_task(self._slot(), name=f"msgbus-servicebus-session-{len(self._tasks)}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Up to ``max_messages`` messages, each the next of its session; waits up to ``timeout`` for the first."""
        if self._closed:
            raise ClosedError(f"receiver for {self.endpoint} is closed")
        self._start()
        out: list[Delivery] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                out.append(await self._ready.get())
        while len(out) < max_messages and not self._ready.empty():
            out.append(self._ready.get_nowait())
        return out

    async def _slot(self) -> None:
        """Take a session, hand over its messages one at a time, let it go when idle; again until paused. A slot
        that found a session adds slots (``_grow``); one that found none ends if others are still looking."""
        counted = True  # _grow counted its first look
        while not self._paused and not self._closed:
            session = await self._take(counted)
            counted = False
            if session is None:
                if self._looking > 0:
                    return
                continue
            try:
                self._grow()
                await self._serve(session)
            except MsgbusError as err:
                log.debug("msgbus: servicebus session slot on %s: %s", self.endpoint, err)
                await asyncio.sleep(0.5)  # a lost connection or session: take another shortly
            finally:
                self._let_go(session)

    async def _take(self, counted: bool) -> _Session | None:
        """The next available session, with its first message if one came at once; None when none was free."""
        if not counted:
            self._looking += 1
        session = _Session(session_receiver(self._adapter.client, self.endpoint), self)
        asked = asyncio.get_running_loop().time()
        try:
            with translated(f"take a session of {self.endpoint}", secrets=self._secrets):
                await session.sdk.__aenter__()
                # The test broker answers a next-available attach that found no session in time with the attach
                # and then a detach (com.microsoft:timeout): the first receive tells.
                session.first = await session.sdk.receive_messages(max_message_count=1, max_wait_time=SESSION_IDLE)
            # The lock started when the broker answered the attach, some time after `asked` (a next-available
            # attach waits for a free session): counted from `asked`, it is renewed early rather than late.
            session.renewed_at = asked
            return session
        except MsgbusError as err:
            self._let_go(session)
            if not _no_session(err):
                log.debug("msgbus: servicebus session slot on %s: %s", self.endpoint, err)
                await asyncio.sleep(0.5)  # a lost connection: try again shortly
            return None
        except BaseException:  # cancelled (close): a session granted meanwhile must not stay locked
            self._let_go(session)
            raise
        finally:
            self._looking -= 1

    def _let_go(self, session: _Session) -> None:
        """Close the session's receiver in the background: the next session need not wait for that round trip."""
        closing = asyncio.create_task(close_quietly(_released_then_closed(session)))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    async def _serve(self, session: _Session) -> None:
        """One session: receive a message, wait until it is settled, receive the next; return when idle."""
        if session.keyless:
            await self._serve_keyless(session)
            return
        while not self._paused and not self._closed:
            batch, session.first = session.first, []
            self._freed.clear()
            if not batch and self._held >= self._slots:  # keyless sessions hold the rest
                await self._until_freed(session)
                continue
            if not batch:
                await session.renew_if_due()  # settling does not renew a session: a busy one would run out
                async with session.lock:
                    with translated(f"receive from a session of {self.endpoint}", secrets=self._secrets):
                        batch = await session.sdk.receive_messages(max_message_count=1, max_wait_time=SESSION_IDLE)
            if not batch or self._paused or self._closed:  # stopped meanwhile: closing the session gives it back
                return
            delivery = self._hand_over(session, batch[0])
            await self._until_settled(delivery, session)

    def _hand_over(self, session: _Session, raw: ServiceBusReceivedMessage) -> SessionDelivery:
        record, attempt, problem = _codec.read(raw, self.endpoint)
        delivery = SessionDelivery(session, record, attempt, raw, problem)
        self._held += 1
        self._ready.put_nowait(delivery)
        return delivery

    def settled(self, delivery: SessionDelivery) -> None:
        """``delivery`` was settled or withdrawn: it no longer counts as held."""
        if delivery.settled.is_set():
            return
        self._held -= 1
        delivery.settled.set()
        self._freed.set()

    async def _serve_keyless(self, session: _Session) -> None:
        """A keyless session: hand over several messages at once while the receiver holds fewer than ``prefetch``,
        receiving more as they are settled; return when idle. When the receiver stops, what it withdrew goes back
        now and the slot keeps the session until the messages being handled are settled."""
        out: list[SessionDelivery] = []
        while not self._paused and not self._closed:
            batch, session.first = session.first, []
            self._freed.clear()
            idle = not out  # nothing unsettled: a receive that waits the full SESSION_IDLE for nothing ends it
            # A share of the room: the sessions' slots receive side by side, so together they may go over it by
            # what their receives in flight bring (a share each), never by a session's whole backlog.
            room = min(self._slots - self._held, max(1, self._slots // 4))
            if not batch and room > 0:
                await session.renew_if_due()
                async with session.lock:
                    with translated(f"receive from a session of {self.endpoint}", secrets=self._secrets):
                        wait = SESSION_IDLE if idle else _SLICE
                        batch = await session.sdk.receive_messages(max_message_count=room, max_wait_time=wait)
            if self._paused or self._closed:  # stopped meanwhile: closing the session gives the batch back
                break
            out += [self._hand_over(session, raw) for raw in batch]
            out = [d for d in out if not d.settled.is_set()]
            if idle and not batch:  # (not: nothing left after a short receive; an abandoned one may be on its way)
                return
            if room <= 0:
                await self._until_freed(session)
        withdrawn = [d.raw for d in out if d.withdrawn]
        if withdrawn:  # released: nobody saw them, so no delivery is counted (abandoned without that SDK path)
            with contextlib.suppress(MsgbusError), translated(f"release on {self.endpoint}", secrets=self._secrets):
                async with session.lock:
                    for raw in withdrawn:
                        await (release_call(session.sdk, raw) or session.sdk.abandon_message(raw))
        for delivery in out:
            if not delivery.withdrawn:
                await self._until_settled(delivery, session)

    async def _until_freed(self, session: _Session) -> None:
        """Wait until a message is settled (``_freed``, cleared by the caller before it looked) or ``session``'s
        lock is due for renewal (then renew it)."""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(session.renewed_at + session.period - loop.time(), 0.01)):
                await self._freed.wait()
                return
        await session.renew_if_due()

    async def _until_settled(self, delivery: SessionDelivery, session: _Session) -> None:
        """Wait for ``delivery``'s settlement, keeping its session locked meanwhile, as the SDK's AutoLockRenewer
        does for a session: the lock is the session's, held while this consumer lives (a consumer that dies or
        closes lets it go), not a message's that a slow ``async for`` would lose."""
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(session.renewed_at + session.period - loop.time(), 0.01)):
                    await delivery.settled.wait()
                    return
            if self._closed or delivery.withdrawn:
                return
            try:
                await session.renew_if_due()
            except MsgbusError:  # the session is lost: its message is back already; settling it will say so
                return

    async def release_many(self, deliveries: Sequence[Delivery]) -> None:
        """Give back unstarted messages released through their sessions' receivers: no delivery counted, each its
        session's next again. Abandoned where that fails (the kit's default nack)."""
        rest: list[Delivery] = []
        for d in deliveries:
            mine = d if isinstance(d, SessionDelivery) and d._receiver is self else None
            call = None if mine is None else release_call(mine._sdk, mine.raw)
            if mine is None or call is None:
                rest.append(d)
                continue
            try:
                await mine._settle("release", call)
            except MsgbusError as err:
                log.debug("msgbus: release of %s failed (%s); abandoned", d.record.id, err)
                rest.append(d)
        await super().release_many(rest)

    async def release(self) -> None:
        """Stop taking sessions; what waits in the ready queue goes back (its slot closes its session). Slots whose
        message is being handled keep their session until it is settled."""
        self._paused = True
        while not self._ready.empty():
            delivery = self._ready.get_nowait()
            delivery.withdrawn = True
            self.settled(delivery)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.release()
        self._adapter.forget(self)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)
        if self._closing:  # let them finish, or their sockets leak
            await asyncio.wait(self._closing, timeout=10)


async def _released_then_closed(session: _Session) -> None:
    """Close a session's receiver, first releasing what arrived on the credit its last receive left open (an
    abandoned message coming back, say): closing the link with it unsettled would count it a delivery nobody saw.
    """
    try:
        async with session.lock:
            await release_read_ahead(session.sdk)
    except Exception as exc:  # the link may be gone already (lost session): closing is what matters
        log.debug("msgbus: servicebus session drain failed: %s", type(exc).__name__)
    await session.sdk.close()


class _Session:
    """One session held by a slot: its SDK receiver (one call at a time) and when its lock was last renewed."""

    def __init__(self, sdk: ServiceBusReceiver, receiver: SessionReceiver) -> None:
        self.sdk = sdk
        self.receiver = receiver
        self.lock = asyncio.Lock()
        self.period = max(receiver._adapter.options.lock_duration / 4, 0.05)  # a stalled loop has 3/4 of it
        self.renewed_at = 0.0
        self.first: list[ServiceBusReceivedMessage] = []  # received while taking the session

    @property
    def keyless(self) -> bool:
        """A session of messages without a key: handed over several at a time, unordered."""
        return (self.sdk.session.session_id or "").startswith(KEYLESS)

    async def renew(self) -> None:
        endpoint = self.receiver.endpoint
        with translated(f"renew session lock on {endpoint}", secrets=self.receiver._secrets):
            async with self.lock:
                await self.sdk.session.renew_lock()
        self.renewed_at = asyncio.get_running_loop().time()

    async def renew_if_due(self) -> None:
        if asyncio.get_running_loop().time() - self.renewed_at >= self.period:
            await self.renew()


def _no_session(err: MsgbusError) -> bool:
    """No session was free within ``ACQUIRE_WAIT`` (the service's com.microsoft:timeout)."""
    return isinstance(err.__cause__, sb.OperationTimeoutError)


class SessionDelivery(Delivery):
    """A message of a session; settled through its session's receiver, its lock is the session's."""

    __slots__ = ("_receiver", "_sdk", "_session", "settled", "withdrawn")

    raw: ServiceBusReceivedMessage

    def __init__(
        self, session: _Session, record: Record, attempt: int, raw: ServiceBusReceivedMessage, problem: str | None
    ) -> None:
        super().__init__(record, attempt, raw, problem)
        self._session = session
        self._receiver = session.receiver
        self._sdk = session.sdk
        self.settled = asyncio.Event()  # its session's next message comes only after this
        self.withdrawn = False  # given back by release() before anyone took it

    async def _settle(self, what: str, call: Awaitable[Any]) -> None:
        try:
            with translated(f"{what} on {self._receiver.endpoint}", secrets=self._receiver._secrets):
                async with self._session.lock:
                    await call
        finally:
            self._receiver.settled(self)

    async def ack(self) -> None:
        await self._settle("complete", self._sdk.complete_message(self.raw))

    async def nack(self, delay: float | None = None) -> None:
        """Abandon: the session's first message again (delivery count + 1). With ``delay``, keep it, and with it
        the session, for ``delay`` seconds first (a re-sent copy would go behind the key's later messages)."""
        if delay:
            step = max(self._receiver._adapter.options.lock_duration / 3, 0.05)
            loop = asyncio.get_running_loop()
            until = loop.time() + delay
            try:
                while (left := until - loop.time()) > 0:
                    await asyncio.sleep(min(step, left))
                    if until - loop.time() > 0:
                        await self.extend(0)
            except MsgbusError:  # the session lock is gone: the message is back already
                self._receiver.settled(self)
                raise
        await self._settle("abandon", self._sdk.abandon_message(self.raw))

    async def dead_letter(self, reason: str) -> None:
        await self._settle(
            "dead-letter",
            self._sdk.dead_letter_message(
                self.raw, reason=reason[: _codec.MAX_REASON], error_description=_codec.description(self.attempt)
            ),
        )

    async def extend(self, seconds: float) -> None:
        """Renew the session's lock (for the entity's lock duration), which holds this message, unless its slot
        renewed it within the last third of that."""
        await self._session.renew_if_due()
