"""msgbus backend for PostgreSQL (``postgresql://`` URLs).

Queues and subscriptions are rows in two tables, leased with ``FOR UPDATE SKIP LOCKED``; LISTEN/NOTIFY wakes
waiting consumers. ``docs/adapters/postgresql.md`` has the mapping, the options and the limits.
"""

from ._adapter import PostgresAdapter, create
from ._receiver import PostgresDelivery, PostgresReceiver

__all__ = ["PostgresAdapter", "PostgresDelivery", "PostgresReceiver", "create"]
