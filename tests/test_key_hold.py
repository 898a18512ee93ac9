"""``msgbus.adapter.KeyHold``: a key's next delivery is handed out only once the one before is settled; what is
held goes back in order when the head goes back or the receiver stops."""

from __future__ import annotations

import asyncio
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from msgbus.adapter import Delivery, KeyHold, Record


class _D(Delivery):
    async def ack(self) -> None: ...

    async def nack(self, delay: float | None = None) -> None: ...

    async def dead_letter(self, reason: str) -> None: ...


def _d(i: int, key: str | None) -> _D:
    return _D(Record(b"", f"m{i}", key=key), 1)


def test_a_keys_next_delivery_waits_until_the_one_before_is_settled() -> None:
    hold: KeyHold[_D] = KeyHold()
    a1, b1, a2, n, a3 = _d(1, "a"), _d(2, "b"), _d(3, "a"), _d(4, None), _d(5, "a")
    assert hold.admit([a1, b1, a2, n, a3]) == [a1, b1, n]
    assert len(hold) == 2 and hold.ready(10) == []
    hold.settled(b1)  # another key: nothing of "a" moves
    assert hold.ready(10) == []
    hold.settled(a1)
    hold.settled(a1)  # idempotent
    assert hold.ready(10) == [a2] and len(hold) == 1
    hold.settled(a3)  # not out yet: ignored
    assert hold.ready(10) == []
    hold.settled(a2)
    assert hold.ready(10) == [a3] and len(hold) == 0
    hold.settled(a3)
    a4 = _d(6, "a")
    assert hold.admit([a4]) == [a4]  # the key is free again


def test_a_released_head_gives_back_what_is_held_behind_it_in_order() -> None:
    hold: KeyHold[_D] = KeyHold()
    a1, a2, a3, b1 = _d(1, "a"), _d(2, "a"), _d(3, "a"), _d(4, "b")
    hold.admit([a1, a2, a3, b1])
    assert hold.behind(a1) == [a2, a3]
    assert hold.released(a2) == []  # not the head
    assert hold.released(a1) == [a2, a3] and len(hold) == 0
    assert hold.released(a1) == []
    hold.settled(a1)  # a late settlement of a released head changes nothing
    assert hold.ready(10) == []
    again = _d(5, "a")
    assert hold.admit([again]) == [again]


def test_drain_gives_back_everything_not_handed_out_and_frees_ready_keys() -> None:
    hold: KeyHold[_D] = KeyHold()
    a1, a2, a3, b1, b2 = _d(1, "a"), _d(2, "a"), _d(3, "a"), _d(4, "b"), _d(5, "b")
    hold.admit([a1, a2, a3, b1, b2])
    hold.settled(a1)  # a2 ready, a3 held behind it
    assert hold.drain() == [a2, a3, b2] and len(hold) == 0
    a4 = _d(6, "a")
    assert hold.admit([a4]) == [a4]  # a2 went back: "a" is not out any more
    b3 = _d(7, "b")
    assert hold.admit([b3]) == []  # b1 is still with the core: b3 waits for it
    hold.settled(b1)
    assert hold.ready(10) == [b3]


def test_a_message_delivered_again_replaces_its_stale_delivery() -> None:
    """The broker took the head back (lock expired, never settled) and delivers it again: it goes out at once,
    instead of waiting forever behind a handle that will never settle; a held one delivered again keeps its place."""
    hold: KeyHold[_D] = KeyHold()
    a1, a2 = _d(1, "a"), _d(2, "a")
    hold.admit([a1, a2])
    a1_again, a2_again = _D(Record(b"", "m1", key="a"), 2), _D(Record(b"", "m2", key="a"), 2)
    assert hold.admit([a1_again, a2_again]) == [a1_again] and len(hold) == 1
    hold.settled(a1)  # the stale handle: ignored
    assert hold.ready(10) == []
    hold.settled(a1_again)
    assert hold.ready(10) == [a2_again]


async def test_wait_returns_when_a_delivery_becomes_ready() -> None:
    hold: KeyHold[_D] = KeyHold()
    a1, a2 = _d(1, "a"), _d(2, "a")
    hold.admit([a1, a2])
    assert not await hold.wait(0.01)
    asyncio.get_running_loop().call_later(0.01, hold.settled, a1)
    assert await hold.wait(5.0)
    assert hold.ready(1) == [a2]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "c", None]), max_size=40), st.randoms(use_true_random=False))
def test_each_key_is_handed_out_in_fetch_order_one_at_a_time(keys: list[str | None], rnd: random.Random) -> None:
    """Any interleaving of fetches, settlements, give-backs and drains: per key, what is out is at most one, and the
    sequence handed out (restarting from what was given back) is the fetch order."""
    hold: KeyHold[_D] = KeyHold()
    pending = [_d(i, k) for i, k in enumerate(keys)]  # the "broker": given-back ones return to its front, in order
    out: list[_D] = []
    done: list[_D] = []
    steps = 0
    while (pending or out or len(hold)) and steps < 1000:
        steps += 1
        move = rnd.random()
        if pending and move < 0.35:
            n = rnd.randint(1, len(pending))
            batch, pending = pending[:n], pending[n:]
            out += hold.admit(batch)
        elif out and move < 0.75:
            d = out.pop(rnd.randrange(len(out)))
            done.append(d)
            hold.settled(d)
        elif out and move < 0.9:
            d = out.pop(rnd.randrange(len(out)))
            pending = sorted([d, *hold.released(d), *pending], key=lambda x: int(x.record.id[1:]))
        elif move < 0.95:
            pending = sorted([*hold.drain(), *pending], key=lambda x: int(x.record.id[1:]))
        out += hold.ready(rnd.randint(1, 5))
        live = [d.record.key for d in out if d.record.key is not None]
        assert len(live) == len(set(live)), "two deliveries of one key out at once"
    for key in {k for k in keys if k is not None}:
        order = [int(d.record.id[1:]) for d in done if d.record.key == key]
        assert order == sorted(order), f"key {key} settled out of fetch order: {order}"
