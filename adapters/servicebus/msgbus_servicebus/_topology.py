"""Entities: created through the administration client (``management=admin``) or only checked over AMQP.

``management=admin`` (default for a real namespace) uses ``ServiceBusAdministrationClient`` (the HTTP
ATOM API, with the connection string's key) to create missing queues, topics and subscriptions, or with
``topology=verify`` to check they exist. ``management=none`` (default for the emulator and the test
broker, neither of which serves that API) creates nothing: the entities exist already (the emulator's
``Config.json``) or the endpoint creates them on first attach (the test broker). ``topology=verify``
then attaches to the entity over AMQP, which fails with ``TopologyError`` for a missing one.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from azure.core import exceptions as core
from azure.servicebus.aio import ServiceBusClient
from azure.servicebus.aio.management import ServiceBusAdministrationClient
from azure.servicebus.exceptions import (
    MessagingEntityNotFoundError,
    OperationTimeoutError,
    ServiceBusConnectionError,
    ServiceBusError,
    SessionLockLostError,
)

from msgbus.adapter import Endpoint
from msgbus.errors import CapabilityMissing, TopologyError

from ._config import ServiceBusOptions
from ._errors import translated
from ._sessions import session_receiver

PING_ENTITY = "msgbus-health"  # attached by ping() where no management API answers
VERIFY_SESSION = "msgbus-verify"  # the session a per_key topology check attaches to (holds no messages)


def _check_sessions(endpoint: Endpoint, requires_session: bool | None, wanted: bool) -> None:
    """An existing entity must require sessions exactly when ``ordering=per_key`` does (neither side can receive
    from the other kind)."""
    if bool(requires_session) != wanted:
        state = "requires" if requires_session else "does not require"
        raise TopologyError(
            f"{endpoint} {state} sessions, but ordering={'per_key' if wanted else 'none'} "
            f"{'needs' if wanted else 'cannot use'} them: use another entity or change the option"
        )


def _check_dedup(endpoint: Endpoint, found: Any, window: float | None) -> None:
    """An existing queue or topic must detect duplicates for at least ``window`` seconds when the option asks
    for it (RequiresDuplicateDetection cannot be changed once the entity exists)."""
    if window is None:
        return
    if not found.requires_duplicate_detection:
        raise TopologyError(
            f"{endpoint.kind} {endpoint.name!r} was created without duplicate detection, which cannot be turned on "
            "later: use another entity, or drop duplicate_detection/dedup_window"
        )
    have = found.duplicate_detection_history_time_window
    if have is not None and have.total_seconds() < window:
        raise TopologyError(
            f"{endpoint.kind} {endpoint.name!r} detects duplicates for {have.total_seconds():g} s, less than "
            f"dedup_window={window:g}: raise its DuplicateDetectionHistoryTimeWindow or lower the option"
        )


class Topology:
    """Declares or verifies entities once per adapter (remembered, so sends do not repeat the check)."""

    def __init__(self, options: ServiceBusOptions) -> None:
        self._options = options
        self._admin: ServiceBusAdministrationClient | None = None
        self._done: set[tuple[str, str, str | None]] = set()

    async def close(self) -> None:
        if self._admin is not None:
            await self._admin.close()
            self._admin = None

    async def declare(self, endpoint: Endpoint, *, create: bool, client: ServiceBusClient) -> None:
        key = (endpoint.kind, endpoint.name, endpoint.subscription)
        if key in self._done:
            return
        secrets = [self._options.key]
        with translated(f"{'declare' if create else 'verify'} {endpoint}", secrets=secrets):
            if self._options.management == "admin":
                await self._admin_declare(endpoint, create)
            else:
                # Without the management API, attach a link: that checks the entity exists, and where entities
                # are created on first attach (the test broker) it creates it now, so a subscription exists
                # before the first publish rather than when its consumer starts receiving.
                await self._amqp_verify(endpoint, client)
        self._done.add(key)

    async def delete(self, endpoint: Endpoint) -> None:
        """Delete a queue (its ``$DeadLetterQueue`` is part of it) through the administration client; a missing one
        is fine. Without it (``management=none``: the emulator, the test broker) there is no way to delete."""
        if self._options.management != "admin":
            raise CapabilityMissing(f"servicebus deletes {endpoint} only with management=admin (the ATOM API)")
        if self._admin is None:
            self._admin = ServiceBusAdministrationClient.from_connection_string(self._options.connection_string)
        self._done.discard((endpoint.kind, endpoint.name, endpoint.subscription))
        with translated(f"delete {endpoint}", secrets=[self._options.key]):
            try:
                await self._admin.delete_queue(endpoint.name)
            except core.ResourceNotFoundError:
                pass

    async def ping(self, client: ServiceBusClient) -> None:
        """One round trip: the namespace's properties, or (no management API) a sender link to a health entity.
        A broker that answers "no such entity" has answered: only connection failures count."""
        secrets = [self._options.key]
        if self._options.management == "admin":
            if self._admin is None:
                self._admin = ServiceBusAdministrationClient.from_connection_string(self._options.connection_string)
            with translated("ping", secrets=secrets):
                await self._admin.get_namespace_properties()
            return
        try:
            with translated("ping", secrets=secrets):
                async with client.get_queue_sender(PING_ENTITY) as sender:
                    await sender.create_message_batch()
        except TopologyError:  # amqp:not-found: the broker answered
            pass

    async def _admin_declare(self, endpoint: Endpoint, create: bool) -> None:
        if self._admin is None:
            self._admin = ServiceBusAdministrationClient.from_connection_string(self._options.connection_string)
        admin, lock = self._admin, timedelta(seconds=self._options.lock_duration)
        count = self._options.max_delivery_count
        sessions = self._options.ordering == "per_key"  # RequiresSession: the key is the session id
        window = self._options.dedup_window  # RequiresDuplicateDetection, on the queue or the topic
        dedup: dict[str, Any] = {}
        if window is not None:
            dedup = {
                "requires_duplicate_detection": True,
                "duplicate_detection_history_time_window": timedelta(seconds=window),
            }
        try:
            if endpoint.kind == "queue":
                found: Any = await admin.get_queue(endpoint.name)
                _check_sessions(endpoint, found.requires_session, sessions)
            else:
                found = await admin.get_topic(endpoint.name)
            _check_dedup(endpoint, found, window)
        except core.ResourceNotFoundError:
            if not create:
                raise TopologyError(f"{endpoint.kind} {endpoint.name!r} does not exist (topology=verify)") from None
            try:
                if endpoint.kind == "queue":
                    await admin.create_queue(
                        endpoint.name, lock_duration=lock, max_delivery_count=count, requires_session=sessions, **dedup
                    )
                else:
                    await admin.create_topic(endpoint.name, **dedup)
            except core.ResourceExistsError:
                pass  # created concurrently by another process
        if endpoint.kind == "topic" and endpoint.subscription is not None:
            try:
                found = await admin.get_subscription(endpoint.name, endpoint.subscription)
                _check_sessions(endpoint, found.requires_session, sessions)
            except core.ResourceNotFoundError:
                if not create:
                    raise TopologyError(f"subscription {endpoint} does not exist (topology=verify)") from None
                try:
                    await admin.create_subscription(
                        endpoint.name,
                        endpoint.subscription,
                        lock_duration=lock,
                        max_delivery_count=count,
                        requires_session=sessions,
                    )
                except core.ResourceExistsError:
                    pass

    async def _amqp_verify(self, endpoint: Endpoint, client: ServiceBusClient) -> None:
        # Attaching a link is the only existence check that needs no management API: a missing entity
        # is refused with amqp:not-found (MessagingEntityNotFoundError -> TopologyError). With ordering=per_key
        # the link is a session receiver (of a session nobody uses): only a session-enabled entity accepts it.
        if self._options.ordering == "per_key" and (endpoint.kind == "queue" or endpoint.subscription is not None):
            try:
                async with session_receiver(client, endpoint, VERIFY_SESSION) as receiver:
                    await receiver.peek_messages(max_message_count=1)
            except SessionLockLostError:
                pass  # attached (a slow open outlived the SDK's idea of the lock): the entity takes sessions
            except (MessagingEntityNotFoundError, ServiceBusConnectionError, OperationTimeoutError):
                raise  # translated as ever: TopologyError, ConnectionLost
            except ServiceBusError as exc:  # the attach was refused: not a session entity
                raise TopologyError(
                    f"{endpoint} cannot be received from with sessions ({exc}): ordering=per_key needs a "
                    "session-enabled queue or subscription (RequiresSession)"
                ) from exc
            return
        if endpoint.subscription is not None:
            async with client.get_subscription_receiver(endpoint.name, endpoint.subscription) as receiver:
                await receiver.peek_messages(max_message_count=1)
        elif endpoint.kind == "queue":
            async with client.get_queue_receiver(endpoint.name) as receiver:
                await receiver.peek_messages(max_message_count=1)
        else:
            async with client.get_topic_sender(endpoint.name) as sender:
                await sender.create_message_batch()
