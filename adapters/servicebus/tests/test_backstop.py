"""The broker's own delivery limit, the entity's MaxDeliveryCount (the test broker's is Service Bus's default, 10),
dead-letters a message no consumer settles.

It sits above msgbus's limit (``run()`` refuses a ``max_attempts`` that is not below it), so it fires only when
no msgbus consumer is left to dead-letter the message with its reason. Needs the local broker.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.integration]


async def test_past_the_brokers_own_limit_the_broker_dead_letters_it() -> None:
    from integration._backstop import past_the_brokers_limit

    attempts, dead = await past_the_brokers_limit("servicebus", "", 10)
    assert attempts == list(range(1, 10 + 1))
    assert dead[0].dead_letter_reason == "MaxDeliveryCountExceeded"
