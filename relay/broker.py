"""The embedded default's Celery broker: messages in one SQLite file, kept until acknowledged.

kombu's file transport deletes a message when a worker fetches it, and its SQLAlchemy transport
marks it invisible forever: either way a worker killed mid-task (SIGKILL, the OOM killer, a power
cut) loses the task, although Relay acknowledges late (`task_acks_late`). This transport does what
kombu's Redis transport does with `visibility_timeout`:

- a fetched message stays in the table, stamped with the time of delivery and a delivery tag of
  its own; the worker's acknowledgement deletes it;
- a requeue (a pool child lost with `task_reject_on_worker_lost`) or a clean shutdown makes it
  visible again at once;
- a message delivered longer than `visibility_timeout` seconds ago and never acknowledged (its
  worker died with it) is delivered again, marked redelivered.

So `visibility_timeout` must exceed the longest task (Relay's hard limit is 360 s; the default is
an hour, as on Redis). One table, WAL mode and a busy timeout: the web server, the workers and
beat share the file. Direct and topic exchanges only (like kombu's SQLAlchemy transport), so
Celery's remote control (`celery inspect`) is off in the embedded default.

Used with `broker_transport = "relay.broker:Transport"` and `broker_url = "sqlite:///PATH"`
(PATH relative to the working folder, or absolute with a fourth slash).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from queue import Empty
from typing import Any

from kombu.transport import virtual

logger = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS message (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    payload TEXT NOT NULL,
    delivery_tag TEXT,
    delivered_at REAL
);
CREATE INDEX IF NOT EXISTS message_queue_ready ON message (queue, delivered_at, id);
CREATE INDEX IF NOT EXISTS message_delivery_tag ON message (delivery_tag);
"""

DEFAULT_VISIBILITY_TIMEOUT = 3600.0


def database_path(url: str) -> Path:
    """`sqlite:///var/broker.sqlite3` (relative) or `sqlite:////srv/relay/broker.sqlite3`."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme != "sqlite" or not rest.startswith("/") or rest == "/":
        raise ValueError(f"the embedded broker needs a URL like sqlite:///path, not {url!r}")
    return Path(rest[1:])


class QoS(virtual.QoS):
    """Acknowledgements go to the table, not only to this process's memory."""

    channel: Channel

    def ack(self, delivery_tag: str) -> None:
        self.channel.message_delete(delivery_tag)
        super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if requeue:
            self.channel.message_release(delivery_tag)
        else:
            self.channel.message_delete(delivery_tag)
        # Not virtual.QoS.reject: that would put a second copy in the queue.
        super().ack(delivery_tag)

    def restore_unacked(self) -> None:
        """At shutdown: what this process holds unacknowledged is visible again at once (if the
        table cannot be reached, the visibility timeout brings it back later)."""
        self._flush()  # type: ignore[attr-defined]
        delivered = self._delivered
        assert delivered is not None
        for delivery_tag in list(delivered):
            try:
                self.channel.message_release(delivery_tag)
            except sqlite3.Error:
                logger.warning("Broker: message %s left for the visibility timeout", delivery_tag)
        delivered.clear()


class Channel(virtual.Channel):
    QoS = QoS
    from_transport_options = (*virtual.Channel.from_transport_options, "visibility_timeout")
    visibility_timeout = DEFAULT_VISIBILITY_TIMEOUT

    # One connection per process and thread (acknowledgements may come from another thread than
    # the consumer's; a forked pool child must not use its parent's), shared by its channels.
    _local = threading.local()

    @property
    def _path(self) -> Path:
        client = self.connection.client
        assert client is not None
        return database_path(str(client.hostname))

    def _db(self) -> sqlite3.Connection:
        path = self._path
        connections: dict[tuple[int, Path], sqlite3.Connection] = self._local.__dict__.setdefault(
            "connections", {}
        )
        key = (os.getpid(), path)
        db = connections.get(key)
        if db is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit: each statement commits unless a BEGIN opened a transaction.
            db = sqlite3.connect(path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
            connections[key] = db
        return db

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        self._db().execute(
            "INSERT INTO message (queue, payload) VALUES (?, ?)", (queue, json.dumps(message))
        )

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        db = self._db()
        ready = "queue = ? AND (delivered_at IS NULL OR delivered_at < ?) ORDER BY id LIMIT 1"
        # A read first, so that an idle poll never takes the write lock.
        probe = db.execute(f"SELECT 1 FROM message WHERE {ready}", (queue, self._due()))  # noqa: S608
        if probe.fetchone() is None:
            raise Empty()
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(
                f"SELECT id, payload, delivered_at FROM message WHERE {ready}",  # noqa: S608
                (queue, self._due()),
            ).fetchone()
            if row is None:
                raise Empty()
            message_id, payload, delivered_at = row
            delivery_tag = uuid.uuid4().hex
            db.execute(
                "UPDATE message SET delivery_tag = ?, delivered_at = ? WHERE id = ?",
                (delivery_tag, time.time(), message_id),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        message: dict[str, Any] = json.loads(payload)
        properties = message.setdefault("properties", {})
        properties["delivery_tag"] = delivery_tag
        if delivered_at is not None:
            properties.setdefault("delivery_info", {})["redelivered"] = True
        return message

    def _due(self) -> float:
        return time.time() - float(self.visibility_timeout)

    def message_delete(self, delivery_tag: str) -> None:
        self._db().execute("DELETE FROM message WHERE delivery_tag = ?", (delivery_tag,))

    def message_release(self, delivery_tag: str) -> None:
        self._db().execute(
            "UPDATE message SET delivery_tag = NULL, delivered_at = NULL WHERE delivery_tag = ?",
            (delivery_tag,),
        )

    def _size(self, queue: str) -> int:
        row = (
            self._db()
            .execute(
                "SELECT count(*) FROM message WHERE queue = ? AND delivered_at IS NULL", (queue,)
            )
            .fetchone()
        )
        return int(row[0])

    def _purge(self, queue: str) -> int:
        cursor = self._db().execute(
            "DELETE FROM message WHERE queue = ? AND delivered_at IS NULL", (queue,)
        )
        return cursor.rowcount

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        self._db().execute("DELETE FROM message WHERE queue = ?", (queue,))


class Transport(virtual.Transport):
    Channel = Channel
    can_parse_url = True
    default_port = 0
    driver_type = "sqlite"
    driver_name = "sqlite3"
    connection_errors = (*virtual.Transport.connection_errors, sqlite3.OperationalError)
    channel_errors = (*virtual.Transport.channel_errors, sqlite3.DatabaseError)

    def driver_version(self) -> str:
        return sqlite3.sqlite_version


def file_queue_drain(folder: Path, database: Path) -> int:
    """Move the messages the file broker of earlier versions left under `folder` (RELAY_BROKER_DIR)
    into `database`, and remove its folders. Returns how many were moved.

    Each process calls it at start (relay.embedded.var_prepare); a file is claimed by renaming
    it, so two processes starting together never move one message twice.
    """
    queue_folder = folder / "queue"
    moved = 0
    if queue_folder.is_dir():
        db = sqlite3.connect(database, timeout=30, isolation_level=None)
        try:
            db.executescript(SCHEMA)
            for path in sorted(queue_folder.glob("*.msg")):
                claimed = path.with_name(f"{path.name}.{os.getpid()}.draining")
                try:
                    path.rename(claimed)
                except FileNotFoundError:
                    continue  # another process took it
                # The file broker names a message <time>_<uuid>.<queue>.msg.
                queue = path.name.partition(".")[2].removesuffix(".msg")
                db.execute(
                    "INSERT INTO message (queue, payload) VALUES (?, ?)",
                    (queue, claimed.read_text()),
                )
                claimed.unlink()
                moved += 1
        finally:
            db.close()
    for sub in ("processed", "control"):  # processed: never kept; control: fanout bindings only
        shutil.rmtree(folder / sub, ignore_errors=True)
    try:
        queue_folder.rmdir()
    except OSError:
        pass  # gone already, or a message another process is still moving
    return moved
