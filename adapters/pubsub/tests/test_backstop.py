"""The broker's own delivery limit, the subscription's dead-letter policy (``max_delivery_attempts``, at least 5),
dead-letters a message no consumer settles.

It sits above msgbus's limit (``run()`` refuses a ``max_attempts`` that is not below it), so it fires only when
no msgbus consumer is left to dead-letter the message with its reason. Needs the local broker.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.integration]


async def test_past_the_brokers_own_limit_the_broker_dead_letters_it() -> None:
    from integration._backstop import past_the_brokers_limit

    attempts, dead = await past_the_brokers_limit("pubsub", "max_delivery_attempts=5&ack_deadline=2&pull_timeout=1", 5)
    assert attempts == list(range(1, 5 + 1))
    assert dead[0].dead_letter_reason is None  # forwarded as it was: no msgbus reason
