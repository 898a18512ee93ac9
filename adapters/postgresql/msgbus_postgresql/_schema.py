"""The bus's tables and every statement the adapter runs on them, for one PostgreSQL schema.

``endpoints`` names queues, topics, subscriptions and their dead-letter destinations; ``messages`` holds one
row per message per queue or subscription (a topic send copies it to each subscription). A row is
deliverable when ``visible_at`` has passed and no earlier row with its key is still there (per-key order).
A lease sets ``visible_at`` to its expiry, a fresh random ``lease`` token and ``attempts + 1``; every
settlement is guarded by that token, so a stale handle never touches a message leased again since.
Times are the server's clock (``now()``), so consumers on several hosts agree.
"""

from __future__ import annotations

from dataclasses import dataclass

# Taken (transaction-scoped) while creating the tables, so buses opening at once do not race on the catalog.
SETUP_LOCK = 0x6D736762_7573  # "msgbus"

# Pages of ``messages`` are filled to this percent, so that a lease (which rewrites every row of a page it takes:
# they are consecutive) finds room for the new versions on the same page. The update is then HOT: no index
# entry is written and the old version is pruned in place. Leases of 256 rows of 16 B to 20 KB were 100 % HOT at
# 40 and 50, 97 % at 60, about 50 % at 70 to 100 (80 before issue 20); at 50 the server spent a third less CPU per
# consumed message than at 80, and a batch send about 5 % more time (40: 25 %, more pages per row).
FILLFACTOR = 50


def _create(s: str) -> str:
    return f"""
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.endpoints (
    id serial PRIMARY KEY,
    kind text NOT NULL,
    name text NOT NULL,
    subscription text NOT NULL,
    dead_letter boolean NOT NULL,
    UNIQUE (kind, name, subscription, dead_letter)
);
CREATE TABLE IF NOT EXISTS {s}.messages (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    endpoint integer NOT NULL,
    visible_at timestamptz NOT NULL,
    lease bigint,
    attempts integer NOT NULL DEFAULT 0,
    key bytea,
    body bytea NOT NULL,
    meta bytea NOT NULL
) WITH (fillfactor = {FILLFACTOR});
DO $$ BEGIN  -- a table an earlier version made (at 80): for rows inserted from now on; no rewrite, no row locks
    IF NOT ('fillfactor={FILLFACTOR}' = ANY(COALESCE((SELECT reloptions FROM pg_class
            WHERE oid = '{s}.messages'::regclass), '{{}}'))) THEN
        ALTER TABLE {s}.messages SET (fillfactor = {FILLFACTOR});
    END IF;
END $$;
CREATE INDEX IF NOT EXISTS messages_ready ON {s}.messages (endpoint, seq);
CREATE INDEX IF NOT EXISTS messages_key ON {s}.messages (endpoint, key, seq) WHERE key IS NOT NULL;
"""


def _insert(s: str, notify: str, targets: str) -> str:
    """Store records $3-$5 (keys, bodies, metas) at the ``targets`` endpoints, visible after $2 seconds.

    Rows are inserted in record order (ORDER BY ordinality), which per-key ordering relies on.
    """
    return f"""
WITH targets AS ({targets}),
     records AS (SELECT * FROM unnest($3::bytea[], $4::bytea[], $5::bytea[]) WITH ORDINALITY AS r(key, body, meta, n)),
     stored AS (
        INSERT INTO {s}.messages (endpoint, visible_at, key, body, meta)
        SELECT t.endpoint, now() + make_interval(secs => $2), r.key, r.body, r.meta
        FROM targets AS t CROSS JOIN records AS r ORDER BY t.endpoint, r.n
        RETURNING endpoint)
SELECT {notify} FROM (SELECT DISTINCT endpoint FROM stored) AS changed"""


@dataclass(frozen=True, slots=True)
class Statements:
    """The SQL of one schema's bus (the schema name is checked by ``_config`` and quoted here)."""

    create: str
    tables_exist: str
    find_endpoint: str
    add_endpoints: str
    insert_queue: str
    insert_topic: str
    lease: str
    next_visible: str
    ack: str
    nack: str
    extend: str
    release: str
    dead_letter: str
    stats: str
    delete_queue: str

    @classmethod
    def for_schema(cls, schema: str, channel: str) -> Statements:
        s = f'"{schema}"'
        notify = f"pg_notify('{channel}', endpoint::text)"
        return cls(
            create=_create(s),
            tables_exist=f"SELECT to_regclass('{s}.messages') IS NOT NULL AND to_regclass('{s}.endpoints') IS NOT NULL",
            find_endpoint=(
                f"SELECT id FROM {s}.endpoints WHERE kind = $1 AND name = $2 AND subscription = $3 AND dead_letter = $4"
            ),
            add_endpoints=(
                f"INSERT INTO {s}.endpoints (kind, name, subscription, dead_letter)"
                " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::boolean[]) ON CONFLICT DO NOTHING"
            ),
            insert_queue=_insert(s, notify, "SELECT $1::integer AS endpoint"),
            # A topic's rows go to the subscriptions that exist when the statement runs (in any process).
            insert_topic=_insert(
                s,
                notify,
                f"SELECT id AS endpoint FROM {s}.endpoints"
                " WHERE kind = 'topic' AND name = $1 AND subscription <> '' AND NOT dead_letter",
            ),
            # $1 endpoint, $2 how many, $3 lease token, $4 lease seconds.
            lease=f"""
WITH picked AS (
    SELECT m.seq FROM {s}.messages AS m
    WHERE m.endpoint = $1 AND m.visible_at <= now()
      AND (m.key IS NULL OR NOT EXISTS (
          SELECT 1 FROM {s}.messages AS e WHERE e.endpoint = m.endpoint AND e.key = m.key AND e.seq < m.seq))
    ORDER BY m.seq LIMIT $2
    FOR UPDATE SKIP LOCKED)
UPDATE {s}.messages AS m SET lease = $3, visible_at = now() + make_interval(secs => $4), attempts = m.attempts + 1
FROM picked WHERE m.seq = picked.seq
RETURNING m.seq, m.attempts, m.key, m.body, m.meta""",
            # Seconds until the next row of the endpoint becomes visible (a delay or a lease running out), among
            # its first 1000: the bounded poll covers the rest. visible_at has no index of its own on purpose:
            # a lease then changes no indexed column, so PostgreSQL updates the row in place (HOT).
            next_visible=(
                "SELECT EXTRACT(EPOCH FROM min(visible_at) - now())::float8 FROM"
                f" (SELECT visible_at FROM {s}.messages WHERE endpoint = $1 ORDER BY seq LIMIT 1000) AS head"
                " WHERE visible_at > now()"
            ),
            # Deleting a keyed row may let the next of its key go: wake the endpoint's consumers then.
            ack=f"""
WITH gone AS (
    DELETE FROM {s}.messages AS m USING unnest($1::bigint[], $2::bigint[]) AS u(seq, lease)
    WHERE m.seq = u.seq AND m.lease = u.lease RETURNING m.endpoint, m.key),
     woken AS (SELECT {notify} FROM (SELECT DISTINCT endpoint FROM gone WHERE key IS NOT NULL) AS keyed)
SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM woken)""",
            # $3: seconds before it is visible again; at once (0) wakes the endpoint's consumers.
            nack=f"""
WITH back AS (
    UPDATE {s}.messages SET lease = NULL, visible_at = now() + make_interval(secs => $3)
    WHERE seq = $1 AND lease = $2 RETURNING endpoint),
     woken AS (SELECT {notify} FROM back WHERE $3 = 0)
SELECT (SELECT count(*) FROM back), (SELECT count(*) FROM woken)""",
            extend=(
                f"UPDATE {s}.messages SET visible_at = now() + make_interval(secs => $3) WHERE seq = $1 AND lease = $2"
            ),
            # Rows leased by a receive that was cancelled before anyone saw them, or handed back unhandled by a
            # stopping consumer (``release_many``): as if never leased.
            release=f"""
WITH back AS (
    UPDATE {s}.messages AS m SET lease = NULL, visible_at = now(), attempts = m.attempts - 1
    FROM unnest($1::bigint[]) AS u(seq) WHERE m.seq = u.seq AND m.lease = $2 RETURNING m.endpoint)
SELECT {notify} FROM (SELECT DISTINCT endpoint FROM back) AS changed""",
            # $1 seq, $2 lease, $3 dead-letter endpoint, $4 the dead letter's meta. One statement: never both
            # or neither. Wakes the dead-letter readers, and the source's (the next of a key may go now).
            dead_letter=f"""
WITH gone AS (DELETE FROM {s}.messages WHERE seq = $1 AND lease = $2 RETURNING endpoint, key, body),
     moved AS (
        INSERT INTO {s}.messages (endpoint, visible_at, key, body, meta)
        SELECT $3, now(), key, body, $4 FROM gone RETURNING endpoint),
     woken AS (SELECT {notify} FROM (SELECT endpoint FROM gone UNION SELECT endpoint FROM moved) AS changed)
SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM woken)""",
            # $1 endpoint, $2 its dead-letter endpoint: rows, rows leased now, dead letters, and the age of the
            # first row's send time (meta's timestamp, or the 5th item of a pre-18 array; 0 or none is unknown) by the
            # server's clock.
            stats=f"""
SELECT count(*), count(*) FILTER (WHERE lease IS NOT NULL AND visible_at > now()),
    (SELECT count(*) FROM {s}.messages WHERE endpoint = $2),
    EXTRACT(EPOCH FROM now())::float8 - (SELECT NULLIF(COALESCE(j ->> 'timestamp', j ->> 4)::float8, 0)
        FROM (SELECT NULLIF(convert_from(meta, 'UTF8'), '')::jsonb AS j
            FROM {s}.messages WHERE endpoint = $1 ORDER BY seq LIMIT 1) AS oldest)
FROM {s}.messages WHERE endpoint = $1""",
            # $1 queue name: its endpoint rows (it and its dead letters) and their messages, in one statement.
            # Ids come from a sequence and are never reused: a process that still has one cached writes rows no
            # endpoint owns, never into another queue.
            delete_queue=f"""
WITH gone AS (DELETE FROM {s}.endpoints WHERE kind = 'queue' AND name = $1 RETURNING id)
DELETE FROM {s}.messages WHERE endpoint IN (SELECT id FROM gone)""",
        )
