"""The AMQP side of the test broker: links, $cbs, $management and settlement, on proton's reactor."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proton import (
    UNDESCRIBED,
    Array,
    Condition,
    Data,
    Delivery,
    Described,
    Disposition,
    Endpoint,
    Handler,
    Link,
    Message,
    symbol,
)
from proton.reactor import Container

from . import codec
from .store import MessageQueue, Store, Stored

log = logging.getLogger("sbbroker")
CREDIT = 500  # credit given to client senders, topped up as messages arrive
MGMT = "/$management"
SESSION_FILTER = symbol("com.microsoft:session-filter")
LOCKED_UNTIL_UTC = symbol("com.microsoft:locked-until-utc")
OPERATION_TIMEOUT = symbol("com.microsoft:timeout")
NEXT_AVAILABLE_WAIT = 65.0  # seconds a next-available session receiver waits when it names no timeout (the SDK's)
DOTNET_EPOCH_TICKS = 621355968000000000  # 0001-01-01 to 1970-01-01 in 100 ns ticks (DateTimeOffset)


class Refused(LookupError):
    """An attach the broker refuses with ``condition`` (echo the source, then detach)."""

    def __init__(self, condition: str, text: str) -> None:
        super().__init__(text)
        self.condition = condition


def entity_path(address: str | None) -> str:
    """``amqps://host:port/q1/$DeadLetterQueue`` -> ``q1/$DeadLetterQueue`` (plain names pass through)."""
    text = address or ""
    if "://" in text:
        text = urllib.parse.urlsplit(text).path
    return text.strip("/")


class Broker(Handler):
    """One proton handler for every connection: the test broker's whole AMQP behaviour."""

    def __init__(self, store: Store, key_name: str | None, key: str | None, state: Path | None) -> None:
        super().__init__()
        self.store = store
        self.key_name, self.key = key_name, key
        self.state = state
        self.stopping = False
        self.container: Container | None = None
        # Next-available session receivers waiting for a free session: (link, queue, deadline), oldest first.
        self.waiting: list[tuple[Link, MessageQueue, float]] = []

    # --- lifecycle ---

    def on_reactor_init(self, event: Any) -> None:
        self.container = event.container
        event.container.schedule(0.05, self)

    def on_timer_task(self, event: Any) -> None:
        now = time.time()
        touched = set(self.store.expired(now)) | set(self.store.due(now))
        for mq, session, holder in self.store.expired_sessions(now):
            touched.update(self.store.unlock_session(mq, session))
            self._lose_session(holder)
        for mq in touched:
            self.pump(mq)
        self._time_out_waiting(now)
        if self.stopping:
            if self.state is not None:
                self.store.save(self.state)
            event.container.stop()
            return
        event.container.schedule(0.05, self)

    def on_connection_bound(self, event: Any) -> None:
        sasl = event.transport.sasl()  # the SDK speaks SASL ANONYMOUS, then authenticates through $cbs
        sasl.allowed_mechs("ANONYMOUS")

    def on_connection_remote_open(self, event: Any) -> None:
        if event.connection.state & Endpoint.LOCAL_UNINIT:
            event.connection.open()

    def on_session_remote_open(self, event: Any) -> None:
        if event.session.state & Endpoint.LOCAL_UNINIT:
            event.session.incoming_capacity = 64 * 1024 * 1024
            event.session.open()

    def on_connection_remote_close(self, event: Any) -> None:
        self._forget(event.connection)
        event.connection.close()

    def on_transport_closed(self, event: Any) -> None:
        if event.connection is not None:
            self._forget(event.connection)

    def on_session_remote_close(self, event: Any) -> None:
        event.session.close()

    def on_link_remote_close(self, event: Any) -> None:
        self._detach(event.link)
        event.link.close()

    def _forget(self, conn: Any) -> None:
        link = conn.link_head(0)
        while link is not None:
            self._detach(link)
            link = link.next(0)
        conn.sb_replies = {}

    def _detach(self, link: Link) -> None:
        # Messages it still holds stay locked until their lock expires, as on the service; a session receiver's
        # messages are locked by its session, which is released with the link (they count as delivered).
        self.waiting = [w for w in self.waiting if w[0] is not link]
        for mq in self.store.queues():
            if link in mq.consumers:
                mq.consumers.remove(link)
        session = getattr(link, "sb_session", None)
        mq = getattr(link, "sb_queue", None)
        if session is not None and mq is not None:
            link.sb_session = None
            lock = mq.session_locks.get(session)
            if lock is not None and lock.holder is link:
                for touched in self.store.unlock_session(mq, session):
                    self.pump(touched)

    # --- attach ---

    def on_link_remote_open(self, event: Any) -> None:
        link = event.link
        log.debug(
            "attach %s %s -> %s",
            "sender" if link.is_sender else "receiver",
            link.remote_source.address,
            link.remote_target.address,
        )
        if not link.state & Endpoint.LOCAL_UNINIT:
            return
        link.source.address = link.remote_source.address
        link.target.address = link.remote_target.address
        link.snd_settle_mode = link.remote_snd_settle_mode
        link.rcv_settle_mode = link.remote_rcv_settle_mode
        try:
            if link.is_sender:
                self._attach_sender(link)
            else:
                self._attach_receiver(link)
        except LookupError as exc:  # echo the source, then detach with the error (see the notes)
            self._refuse(link, exc.condition if isinstance(exc, Refused) else "amqp:not-found", str(exc))

    @staticmethod
    def _refuse(link: Link, condition: str, text: str) -> None:
        link.open()
        link.condition = Condition(condition, text)
        link.close()

    def _attach_sender(self, link: Link) -> None:
        address = link.remote_source.address or ""
        if address == "$cbs" or address.endswith(MGMT):
            replies = getattr(link.connection, "sb_replies", None) or {}
            replies[address] = link  # where $cbs/$management answers go (proton keeps wrapper attributes)
            link.connection.sb_replies = replies
            link.open()
            return
        mq = self.store.message_queue(entity_path(address))
        wanted, session = _session_filter(link)
        if mq.sessions is None:
            self.store.require_sessions(mq, wanted)
        elif mq.sessions != wanted:
            raise Refused(
                "amqp:not-allowed",
                f"'{mq.path}' requires sessions: receive with a session receiver"
                if mq.sessions
                else f"'{mq.path}' does not require sessions: a session receiver cannot be created on it",
            )
        if not wanted:
            link.open()
            mq.consumers.append(link)
            link.sb_queue = mq
            return
        now = time.time()
        if session is None:
            session = mq.free_session(now)
            if session is None:  # answer the attach once a session frees up, or with a timeout
                timeout = (link.remote_properties or {}).get(OPERATION_TIMEOUT)
                wait = int(timeout) / 1000 if timeout is not None else NEXT_AVAILABLE_WAIT
                self.waiting.append((link, mq, now + wait))
                return
        else:
            lock = mq.session_locks.get(session)
            if lock is not None and lock.until > now:
                raise Refused(
                    "com.microsoft:session-cannot-be-locked", f"session '{session}' is locked by another receiver"
                )
        self._grant(link, mq, session)

    def _grant(self, link: Link, mq: MessageQueue, session: str) -> None:
        """Lock ``session`` for ``link`` and answer its attach, echoing the session id and the lock's end."""
        until = self.store.lock_session(mq, session, link)
        link.source.filter.put_dict({SESSION_FILTER: session})
        link.properties = {LOCKED_UNTIL_UTC: _ticks(until)}
        link.open()
        mq.consumers.append(link)
        link.sb_queue = mq
        link.sb_session = session
        log.debug("session %s of %s locked", session, mq.path)

    def _grant_waiting(self, mq: MessageQueue) -> None:
        """Give free sessions of ``mq`` to the receivers waiting for one, oldest first."""
        now = time.time()
        for waiter in [w for w in self.waiting if w[1] is mq]:
            session = mq.free_session(now)
            if session is None:
                return
            self.waiting.remove(waiter)
            self._grant(waiter[0], mq, session)

    def _time_out_waiting(self, now: float) -> None:
        for waiter in [w for w in self.waiting if w[2] <= now]:
            self.waiting.remove(waiter)
            self._refuse(waiter[0], "com.microsoft:timeout", "no session became available in time")

    def _lose_session(self, link: Link) -> None:
        """The session lock ran out: the receiver's link ends with session-lock-lost, as on the service."""
        mq = getattr(link, "sb_queue", None)
        if mq is not None and link in mq.consumers:
            mq.consumers.remove(link)
        link.sb_session = None
        if link.state & Endpoint.LOCAL_ACTIVE:
            link.condition = Condition("com.microsoft:session-lock-lost", "the session lock has expired")
            link.close()

    def _attach_receiver(self, link: Link) -> None:
        address = link.remote_target.address or ""
        if address != "$cbs" and not address.endswith(MGMT):
            path = entity_path(address)
            if "/" in path:
                raise LookupError(f"cannot send to '{path}'")
            link.sb_entity = self.store.entity(path, None)
        link.open()
        link.flow(CREDIT)

    # --- flow and deliveries ---

    def on_link_flow(self, event: Any) -> None:
        link = event.link
        mq = getattr(link, "sb_queue", None)
        if link.is_sender and mq is not None:
            self.pump(mq)
            if link.drain_mode:
                link.drained()

    def on_delivery(self, event: Any) -> None:
        dlv = event.delivery
        if dlv.link.is_receiver:
            if dlv.readable and not dlv.partial:
                self._incoming(dlv)
        elif dlv.updated:
            self._settlement(dlv)

    def pump(self, mq: MessageQueue) -> None:
        """Hand ready messages to receivers with credit, round robin (on a session queue, each receiver the
        messages of its session, in order)."""
        if mq.sessions:
            self._grant_waiting(mq)
            for link in mq.consumers:
                while link.credit > 0 and link.state & Endpoint.LOCAL_ACTIVE:
                    msg = mq.pop_ready(link.sb_session)
                    if msg is None:
                        break
                    self._deliver(link, mq, msg)
        while mq.ready and mq.consumers and not mq.sessions:
            links = [link for link in mq.consumers if link.credit > 0 and link.state & Endpoint.LOCAL_ACTIVE]
            if not links:
                return
            for link in links:
                msg = mq.pop_ready()
                if msg is None:
                    return
                self._deliver(link, mq, msg)
            mq.consumers = mq.consumers[1:] + mq.consumers[:1]
        for link in mq.consumers:
            if link.drain_mode and link.credit > 0:
                link.drained()

    def _deliver(self, link: Link, mq: MessageQueue, msg: Stored) -> None:
        peek_lock = link.remote_snd_settle_mode != Link.SND_SETTLED
        token = self.store.lock(mq, msg, link) if peek_lock else uuid.uuid4()
        annotations: dict[str, Any] = {
            "x-opt-sequence-number": msg.seq,
            "x-opt-enqueued-time": codec.ms(msg.enqueued),
            "x-opt-enqueue-sequence-number": msg.seq,
        }
        if peek_lock and not mq.sessions:  # a session message is locked by its session (not announced per message)
            annotations["x-opt-locked-until"] = codec.ms(msg.locked_until)
        if msg.dead_letter:
            annotations["x-opt-deadletter-source"] = mq.path.rsplit("/", 1)[0]
        raw = codec.rewrite(
            msg.raw, delivery_count=msg.delivery_count, annotations=annotations, properties=msg.dead_letter or None
        )
        dlv = link.delivery(token.bytes_le)  # the lock token is the delivery tag, .NET Guid byte order
        link.stream(raw)
        link.advance()
        if peek_lock:
            dlv.sb_token = token
        else:
            self.store.remove(mq, msg)
            dlv.settle()

    def _settlement(self, dlv: Delivery) -> None:
        token = getattr(dlv, "sb_token", None)
        if token is None:  # a $cbs/$management reply the client settled
            if dlv.remote_settled:
                dlv.settle()
            return
        state = dlv.remote_state
        touched: MessageQueue | None = None
        if self.store.locked(token) is None:
            queue = getattr(dlv.link, "sb_queue", None)
            lost = "session" if queue is not None and queue.sessions else "message"
            dlv.local.condition = Condition(f"com.microsoft:{lost}-lock-lost", "the lock has expired")
            dlv.update(Disposition.REJECTED)
            dlv.settle()
            return
        if state == Disposition.ACCEPTED:
            self.store.complete(token)
        elif state == Disposition.REJECTED:
            cond = dlv.remote.condition
            info = cond.info if cond is not None and isinstance(cond.info, dict) else {}
            touched = self.store.dead_letter(
                token, str(info.get("DeadLetterReason", "")), str(info.get("DeadLetterErrorDescription", ""))
            )
        elif state == Disposition.MODIFIED and dlv.remote.undeliverable:
            self.store.defer(token)
        elif state == Disposition.MODIFIED:
            touched = self.store.release(token, count=bool(dlv.remote.failed))
        else:  # released: back without counting a delivery
            touched = self.store.release(token, count=False)
        dlv.update(state)
        dlv.settle()
        if touched is not None:
            self.pump(touched)

    # --- incoming messages ---

    def _incoming(self, dlv: Delivery) -> None:
        link = dlv.link
        raw = bytes(link.recv(dlv.pending))
        link.advance()
        address = link.remote_target.address or ""
        try:
            if address == "$cbs":
                self._cbs(link, raw)
            elif address.endswith(MGMT):
                self._management(link, entity_path(address[: -len(MGMT)]), raw)
            else:
                self._store(link.sb_entity, raw)
            dlv.update(Disposition.ACCEPTED)
        except (ValueError, LookupError) as exc:
            log.info("refused a message on %s: %s", address, exc)
            # With its info map: the SDK reads the rejection's error as three fields (a missing info hung the send).
            dlv.local.condition = Condition("amqp:invalid-field", str(exc), {symbol("reason"): str(exc)})
            dlv.update(Disposition.REJECTED)
        dlv.settle()
        if link.credit < CREDIT // 2:
            link.flow(CREDIT - link.credit)

    def _store(self, ent: Any, raw: bytes) -> None:
        touched: list[MessageQueue] = []
        batch = codec.split_batch(raw)
        if ent.queue is not None and ent.queue.sessions and any(codec.group_id(one) is None for one in batch):
            raise ValueError(f"'{ent.name}' requires sessions: a message without a SessionId cannot be sent to it")
        self.store.check_ids(ent, batch)
        for one in batch:
            if self.store.duplicate(ent, one):  # accepted, and dropped: duplicate detection
                log.debug("duplicate dropped on %s: %s", ent.name, codec.message_id(one))
                continue
            due = codec.message_annotations(one).get("x-opt-scheduled-enqueue-time")
            if due is not None and int(due) / 1000 > time.time():
                self.store.schedule(ent, one, int(due) / 1000)
            else:
                touched += self.store.enqueue(ent, one)
        for mq in set(touched):
            self.pump(mq)

    def _reply(self, link: Link, address: str, request: Message, props: dict[str, Any], body: Any = None) -> None:
        """Answer ``request`` on our sender whose source is ``address``, in the same connection."""
        out = (getattr(link.connection, "sb_replies", None) or {}).get(address)
        if out is None:
            log.warning("no reply link for %s", address)
            return
        out.send(Message(correlation_id=request.id, properties=props, body=body), tag=uuid.uuid4().bytes)

    def _cbs(self, link: Link, raw: bytes) -> None:
        request = Message()
        request.decode(raw)
        props = request.properties or {}
        token = request.body if isinstance(request.body, str) else bytes(request.body or b"").decode()
        ok, why = self._check_token(str(props.get("name", "")), token)
        log.debug("put-token %s: %s", props.get("name"), why)
        status = {"status-code": 200 if ok else 401, "status-description": why}
        self._reply(link, "$cbs", request, status)

    def _check_token(self, audience: str, token: str) -> tuple[bool, str]:
        if self.key is None:
            return True, "OK"
        fields = dict(urllib.parse.parse_qsl(token.removeprefix("SharedAccessSignature ")))
        signed = urllib.parse.quote_plus(fields.get("sr", "")) + "\n" + fields.get("se", "")
        digest = hmac.new(self.key.encode(), signed.encode(), hashlib.sha256).digest()
        if fields.get("skn") != self.key_name or not hmac.compare_digest(
            base64.b64encode(digest).decode(), fields.get("sig", "")
        ):
            return False, "InvalidSignature: the token's signature does not match the key"
        if float(fields.get("se", "0")) < time.time():
            return False, "ExpiredToken"
        return True, "OK"

    # --- $management ---

    def _management(self, link: Link, path: str, raw: bytes) -> None:
        request = Message()
        request.decode(raw)
        op = str((request.properties or {}).get("operation", ""))
        body = request.body if isinstance(request.body, dict) else {}
        body = {str(k): v for k, v in body.items()}
        handler: Callable[[str, dict[str, Any]], tuple[int, str | None, Any]] | None = getattr(
            self, "_op_" + op.removeprefix("com.microsoft:").replace("-", "_"), None
        )
        description = "OK"
        if handler is None:
            status, condition, result = 501, "amqp:not-implemented", None
            description = f"operation {op!r} is not implemented by the test broker"
        else:
            try:
                status, condition, result = handler(path, body)
            except LookupError as exc:
                status, condition, result, description = 404, "com.microsoft:entity-not-found", None, str(exc)
            except ValueError as exc:
                status, condition, result, description = 400, "com.microsoft:argument-error", None, str(exc)
        props: dict[str, Any] = {"statusCode": status, "statusDescription": condition or description}
        if condition:
            props["statusDescription"] = description if description != "OK" else condition
            props["errorCondition"] = symbol(condition)
        self._reply(link, link.remote_target.address, request, props, result)

    def _tokens(self, body: dict[str, Any]) -> list[uuid.UUID]:
        tokens = body.get("lock-tokens")
        return list(tokens.elements if isinstance(tokens, Array) else tokens or [])

    def _op_renew_lock(self, path: str, body: dict[str, Any]) -> tuple[int, str | None, Any]:
        expirations = []
        for token in self._tokens(body):
            found = self.store.locked(token)
            if found is None:
                return 410, "com.microsoft:message-lock-lost", None
            found[1].locked_until = time.time() + self.store.lock_duration
            expirations.append(codec.ms(found[1].locked_until))
        return 200, None, {"expirations": _array(Data.TIMESTAMP, expirations)}

    def _op_renew_session_lock(self, path: str, body: dict[str, Any]) -> tuple[int, str | None, Any]:
        until = self.store.renew_session(self.store.message_queue(path), str(body.get("session-id", "")))
        if until is None:
            return 410, "com.microsoft:session-lock-lost", None
        return 200, None, {"expiration": codec.ms(until)}

    def _op_get_session_state(self, path: str, body: dict[str, Any]) -> tuple[int, str | None, Any]:
        state = self.store.message_queue(path).session_state.get(str(body.get("session-id", "")))
        return 200, None, {"session-state": state}

    def _op_set_session_state(self, path: str, body: dict[str, Any]) -> tuple[int, str | None, Any]:
        mq, state = self.store.message_queue(path), body.get("session-state")
        mq.session_state[str(body.get("session-id", ""))] = bytes(state) if state is not None else b""
        return 200, None, None

    def _op_update_disposition(self, path: str, body: dict[str, Any]) -> tuple[int, str | None, Any]:
        status = str(body.get("disposition-status", ""))
        for token in self._tokens(body):
            if self.store.locked(token) is None:
                return 410, "com.microsoft:message-lock-lost", None
            touched: MessageQueue | None = None
            if status == "completed":
                self.store.complete(token)
            elif status == "abandoned":
                touched = self.store.release(token, count=True)
            elif status == "defered":
                self.store.defer(token)
            elif status == "suspended":
                touched = self.store.dead_letter(
                    token, str(body.get("deadletter-reason", "")), str(body.get("deadletter-description", ""))
                )
            if touched is not None:
                self.pump(touched)
        return 200, None, None

    def _op_schedule_message(self, path: str, body: dict[str, Any]) -> tuple[int, str | None, Any]:
        ent = self.store.entity(path, None)
        seqs = []
        items = [{str(k): v for k, v in item.items()} for item in body.get("messages", [])]
        raws = [bytes(item["message"]) for item in items]
        self.store.check_ids(ent, raws)  # ValueError: argument-error
        for raw in raws:
            if self.store.duplicate(ent, raw):  # accepted, not scheduled: its number cancels nothing
                seqs.append(self.store.next_seq())
                continue
            due = codec.message_annotations(raw).get("x-opt-scheduled-enqueue-time")
            seqs.append(self.store.schedule(ent, raw, int(due) / 1000 if due is not None else time.time()))
        return 200, None, {"sequence-numbers": _array(Data.LONG, seqs)}

    def _op_cancel_scheduled_message(self, path: str, body: dict[str, Any]) -> tuple[int, str | None, Any]:
        seqs = body.get("sequence-numbers")
        self.store.cancel(self.store.entity(path, None), set(seqs.elements if isinstance(seqs, Array) else seqs or []))
        return 200, None, None

    def _op_peek_message(self, path: str, body: dict[str, Any]) -> tuple[int, str | None, Any]:
        mq = self.store.message_queue(path)
        start, count = int(body.get("from-sequence-number", 0)), int(body.get("message-count", 1))
        session = body.get("session-id")
        found = sorted(
            (m for m in mq.messages.values() if m.seq >= start and (session is None or m.session == str(session))),
            key=lambda m: m.seq,
        )[:count]
        if not found:
            return 204, None, None
        return 200, None, {"messages": [{"message": self._encoded(mq, m)} for m in found]}

    def _op_receive_by_sequence_number(self, path: str, body: dict[str, Any]) -> tuple[int, str | None, Any]:
        mq = self.store.message_queue(path)
        seqs = body.get("sequence-numbers")
        out = []
        for seq in seqs.elements if isinstance(seqs, Array) else seqs or []:
            msg = mq.messages.get(int(seq))
            if msg is None or not msg.deferred or msg.token is not None:
                return 404, "com.microsoft:message-not-found", None
            token = self.store.lock(mq, msg, None)
            out.append({"lock-token": token, "message": self._encoded(mq, msg)})
        return 200, None, {"messages": out}

    def _encoded(self, mq: MessageQueue, msg: Stored) -> bytes:
        annotations: dict[str, Any] = {"x-opt-sequence-number": msg.seq, "x-opt-enqueued-time": codec.ms(msg.enqueued)}
        if msg.token is not None:
            annotations["x-opt-locked-until"] = codec.ms(msg.locked_until)
        return codec.rewrite(
            msg.raw, delivery_count=msg.delivery_count, annotations=annotations, properties=msg.dead_letter or None
        )


def _session_filter(link: Link) -> tuple[bool, str | None]:
    """Whether the receiver asked for a session (a ``com.microsoft:session-filter``), and which (None: next
    available)."""
    data = link.remote_source.filter
    data.rewind()
    if not data.next():
        return False, None
    filters = data.get_object()
    if not isinstance(filters, dict) or SESSION_FILTER not in filters:
        return False, None
    value = filters[SESSION_FILTER]
    if isinstance(value, Described):
        value = value.value
    if isinstance(value, bytes | memoryview):
        value = bytes(value).decode()
    return True, None if value is None else str(value)


def _ticks(seconds: float) -> int:
    """A time as .NET ticks (100 ns since 0001-01-01), as Service Bus sends ``locked-until-utc``."""
    return int(seconds * 10_000_000) + DOTNET_EPOCH_TICKS  # proton encodes an int as a long


def _array(kind: int, values: list[Any]) -> Array:
    return Array(UNDESCRIBED, kind, *values)


def serve(host: str, port: int, broker: Broker) -> None:
    """Run the broker until ``broker.stopping`` is set (by SIGTERM/SIGINT)."""
    container = Container(broker)
    container.container_id = "msgbus-sbbroker"
    container.listen(f"{host}:{port}")
    container.run()
