"""The embedded broker (relay.broker): a message stays until acknowledged, comes back when its
consumer is gone, and the file broker's leftovers of earlier versions are moved into it."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from kombu import Connection, Exchange, Queue

from relay.broker import file_queue_drain

ROOT = Path(__file__).resolve().parent.parent.parent


def _connection(path: Path, visibility_timeout: float = 3600) -> Connection:
    return Connection(
        f"sqlite:///{path}",
        transport="relay.broker:Transport",
        transport_options={"visibility_timeout": visibility_timeout},
    )


def _rows(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT count(*) FROM message").fetchone()[0])


def test_it_keeps_a_message_until_it_is_acknowledged(tmp_path: Path) -> None:
    database = tmp_path / "broker.sqlite3"
    with _connection(database) as conn:
        queue = conn.SimpleQueue("quick")
        queue.put({"n": 1})
        message = queue.get(timeout=2)
        assert message.payload == {"n": 1}
        assert _rows(database) == 1  # fetched, not deleted
        message.ack()
        assert _rows(database) == 0
        queue.close()


def test_a_requeued_message_comes_back_at_once_and_only_once(tmp_path: Path) -> None:
    database = tmp_path / "broker.sqlite3"
    with _connection(database) as conn:
        queue = conn.SimpleQueue("quick")
        queue.put({"n": 1})
        queue.get(timeout=2).requeue()
        again = queue.get(timeout=2)
        assert again.payload == {"n": 1}
        again.ack()
        assert _rows(database) == 0
        queue.close()


def test_a_message_whose_consumer_died_is_delivered_again_after_the_visibility_timeout(
    tmp_path: Path,
) -> None:
    database = tmp_path / "broker.sqlite3"
    with _connection(database) as conn:
        conn.SimpleQueue("quick").put({"n": 1})
    # A consumer that fetches and then dies: nothing acknowledges, nothing restores.
    code = (
        "import os, sys; from kombu import Connection; "
        "c = Connection(sys.argv[1], transport='relay.broker:Transport'); "
        "m = c.SimpleQueue('quick').get(timeout=2); print(m.payload, flush=True); os._exit(9)"
    )
    died = subprocess.run(
        [sys.executable, "-c", code, f"sqlite:///{database}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert died.returncode == 9 and "'n': 1" in died.stdout, died.stderr
    with _connection(database, visibility_timeout=1) as conn:
        queue = conn.SimpleQueue("quick")
        # Delivered, unacknowledged and not yet timed out: nobody else gets it.
        assert queue.qsize() == 0
        time.sleep(1.2)
        again = queue.get(timeout=2)
        assert again.payload == {"n": 1}
        assert again.delivery_info["redelivered"] is True
        again.ack()
        queue.close()
    assert _rows(database) == 0


def test_a_clean_shutdown_gives_back_what_it_held(tmp_path: Path) -> None:
    database = tmp_path / "broker.sqlite3"
    with _connection(database) as conn:
        queue = conn.SimpleQueue("quick")
        queue.put({"n": 1})
        queue.get(timeout=2)  # never acknowledged
        queue.close()
    with _connection(database) as conn:
        queue = conn.SimpleQueue("quick")
        assert queue.get(timeout=2).payload == {"n": 1}
        queue.close()


def test_the_file_brokers_leftovers_are_moved_into_it_at_start(tmp_path: Path) -> None:
    """`make run` on a machine with an old var/broker/: pending messages are kept."""
    broker = tmp_path / "var" / "broker"
    folders = {
        "data_folder_in": str(broker / "queue"),
        "data_folder_out": str(broker / "queue"),
        "processed_folder": str(broker / "processed"),
        "control_folder": str(broker / "control"),
    }
    for folder in folders.values():
        os.makedirs(folder, exist_ok=True)
    quick = Queue("quick", Exchange("quick"), routing_key="quick")
    with Connection("filesystem://", transport_options=folders) as old:
        old.Producer().publish(
            {"n": 1}, exchange=quick.exchange, routing_key="quick", declare=[quick]
        )
    assert len(list((broker / "queue").glob("*.quick.msg"))) == 1

    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "RELAY_BROKER_DIR")}
    subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env={**env, "RELAY_VAR_DIR": str(tmp_path / "var")},
        capture_output=True,
        check=True,
    )
    assert sorted(p.name for p in broker.iterdir()) == ["broker.sqlite3"]
    with _connection(broker / "broker.sqlite3") as conn:
        queue = conn.SimpleQueue("quick")
        queue.get(timeout=2).ack()
        queue.close()
    assert file_queue_drain(broker, broker / "broker.sqlite3") == 0  # nothing left, idempotent
