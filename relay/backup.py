"""Backups that restore: the database and the list of stored objects it refers to, in one file.

`manage.py backup` writes the file; `manage.py restore` loads it into an empty database and checks
the storage against it. The images are not in the file: the storage is backed up by the
operator's bucket versioning or a sync (README, "Backups and restore"), and the file's inventory
says which objects that storage must hold for the restored database.

The file
    One tar, written 0600 and never over an existing file, with three members in this order:
      manifest.json       format and version, the time (UTC), the database vendor and server
                          version, the migrations applied, the rows of every table, the
                          triggers (the audit trail's and the invoices' append-only guards), the
                          inventory's totals, and each other member's size and SHA-256
      database.dump       PostgreSQL: `pg_dump --format=custom`, or
      database.sqlite3    SQLite (the embedded default): a copy by sqlite3's online backup API
      inventory.jsonl.gz  one JSON line per stored object the database refers to: every
                          instance (its key, size and SHA-256 as recorded when it arrived), every
                          report PDF (key and size), every disc image (key; it can be made again)
    On PostgreSQL the dump, the row counts and the inventory are read in one snapshot
    (`pg_export_snapshot`, `pg_dump --snapshot`): they describe the same instant, so a restore
    can check every table's rows exactly. On SQLite they are all read from the copy.

Encryption
    The dump is every patient's data. With a passphrase (`--passphrase-file`), the whole tar is
    sealed with AES-256-GCM in 1 MiB chunks, the key made from the passphrase by scrypt; each
    chunk's nonce carries its number and whether it is the last, so a chunk changed, reordered,
    dropped or cut off fails to open. Without one, the file is plain and must live on encrypted
    storage; the checksums then find damage, not a deliberate change (compare the file's SHA-256,
    printed and audited at backup time, before restoring it).

Restoring
    Nothing changes until the whole file has been read and checked (chunks, checksums, format,
    vendor, migrations, an empty target). PostgreSQL loads in one transaction (`pg_restore` into
    `psql --single-transaction`); SQLite in one step of the backup API. Then every table's rows
    are compared with the manifest's counts, the triggers with its list, and the inventory with
    the storage (each object there, with its recorded size; `--verify-hashes` reads and hashes
    every one). Output names no patient: storage keys hold Study and Series UIDs, so problems go
    to a file (0600) and the terminal gets counts.
"""

from __future__ import annotations

import getpass
import gzip
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import socket
import sqlite3
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from django.core.files.storage import Storage, storages
from django.db import DatabaseError, connection, transaction
from django.db.migrations.loader import MigrationLoader

FORMAT = "relay-backup"
VERSION = 1
MANIFEST = "manifest.json"
DUMP_POSTGRESQL = "database.dump"
DUMP_SQLITE = "database.sqlite3"
INVENTORY = "inventory.jsonl.gz"
PARTS = {"postgresql": DUMP_POSTGRESQL, "sqlite": DUMP_SQLITE}
# Stored objects the restored database cannot do without; disc images are made again on request.
REQUIRED_KINDS = ("instance", "report")

# The sealed form: MAGIC, a scrypt salt and a nonce prefix (the header, authenticated with every
# chunk), then chunks of at most CHUNK bytes, each followed by its 16-byte GCM tag.
MAGIC = b"RELAY-BACKUP-AES256GCM-1\n"
SALT_BYTES = 16
PREFIX_BYTES = 7
TAG_BYTES = 16
CHUNK = 1 << 20
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
MIN_PASSPHRASE = 12

READ_BLOCK = 1 << 20
CHECK_THREADS = 8  # objects checked at once: S3 answers each HEAD in milliseconds, not microseconds

# libpq's environment variable for each connection option dj-database-url may put in OPTIONS.
_PG_OPTIONS = {
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslcrl": "PGSSLCRL",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "options": "PGOPTIONS",
    "application_name": "PGAPPNAME",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "service": "PGSERVICE",
    "passfile": "PGPASSFILE",
}


class BackupError(Exception):
    """What went wrong, said for the operator; nothing in it names a patient."""


# --- the sealed (encrypted) form -----------------------------------------------------------------


def _key(passphrase: str, salt: bytes) -> bytes:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    return Scrypt(salt=salt, length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(
        passphrase.encode()
    )


def _nonce(prefix: bytes, number: int, last: bool) -> bytes:
    return prefix + number.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


class _Sealer(io.RawIOBase):
    """A write-only stream that seals what is written to it into `out`, chunk by chunk."""

    def __init__(self, out: IO[bytes], passphrase: str) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        super().__init__()
        salt, prefix = secrets.token_bytes(SALT_BYTES), secrets.token_bytes(PREFIX_BYTES)
        self._header = MAGIC + salt + prefix
        self._aead = AESGCM(_key(passphrase, salt))
        self._prefix = prefix
        self._out = out
        self._buffer = bytearray()
        self._number = 0
        out.write(self._header)

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._buffer += data
        # A full chunk goes out only once more follows it: the last chunk is known at close.
        while len(self._buffer) > CHUNK:
            self._seal(bytes(self._buffer[:CHUNK]), last=False)
            del self._buffer[:CHUNK]
        return len(data)

    def _seal(self, chunk: bytes, *, last: bool) -> None:
        nonce = _nonce(self._prefix, self._number, last)
        self._out.write(self._aead.encrypt(nonce, chunk, self._header))
        self._number += 1

    def close(self) -> None:
        if not self.closed:
            self._seal(bytes(self._buffer), last=True)
            self._buffer.clear()
        super().close()


class _Opener(io.RawIOBase):
    """A read-only stream of what a sealed file holds; raises BackupError at the first chunk
    that does not open (damaged, cut short, or the wrong passphrase)."""

    def __init__(self, source: IO[bytes], passphrase: str) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        super().__init__()
        header = source.read(len(MAGIC) + SALT_BYTES + PREFIX_BYTES)
        if len(header) != len(MAGIC) + SALT_BYTES + PREFIX_BYTES or not header.startswith(MAGIC):
            raise BackupError("The backup file is not an encrypted Relay backup.")
        salt = header[len(MAGIC) : len(MAGIC) + SALT_BYTES]
        self._prefix = header[len(MAGIC) + SALT_BYTES :]
        self._header = header
        self._aead = AESGCM(_key(passphrase, salt))
        self._source = source
        self._number = 0
        self._ahead = source.read(CHUNK + TAG_BYTES)
        self._plain = b""
        self._done = False

    def readable(self) -> bool:
        return True

    def _next(self) -> None:
        from cryptography.exceptions import InvalidTag

        sealed = self._ahead
        self._ahead = self._source.read(CHUNK + TAG_BYTES) if sealed else b""
        last = not self._ahead
        try:
            self._plain = self._aead.decrypt(
                _nonce(self._prefix, self._number, last), sealed, self._header
            )
        except InvalidTag:
            raise BackupError(
                "The backup file does not open: the passphrase is wrong, or the file is damaged"
                " or cut short. Nothing was changed."
            ) from None
        self._number += 1
        self._done = last

    def readinto(self, buffer: Any) -> int:
        while not self._plain and not self._done:
            self._next()
        n = min(len(buffer), len(self._plain))
        buffer[:n] = self._plain[:n]
        self._plain = self._plain[n:]
        return n


def passphrase_read(path: Path) -> str:
    """The passphrase in `path` (first line), from a file only its owner may read."""
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as exc:
        raise BackupError(f"Cannot read the passphrase file {path}: {exc.strerror}.") from None
    if mode & 0o077:
        raise BackupError(f"The passphrase file {path} may be read by others: chmod 600 it first.")
    passphrase = text.splitlines()[0].strip() if text.strip() else ""
    if len(passphrase) < MIN_PASSPHRASE:
        raise BackupError(f"The passphrase must be at least {MIN_PASSPHRASE} characters long.")
    return passphrase


# --- what the database holds ---------------------------------------------------------------------


def _vendor() -> str:
    if connection.vendor not in PARTS:
        raise BackupError(f"Backups know PostgreSQL and SQLite, not {connection.vendor}.")
    return connection.vendor


def _tables(cursor: Any, vendor: str) -> list[str]:
    if vendor == "postgresql":
        cursor.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1"
        )
    else:
        cursor.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'"
            " AND name NOT LIKE 'sqlite_%' ORDER BY 1"
        )
    return [row[0] for row in cursor.fetchall()]


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _counts(cursor: Any, vendor: str) -> dict[str, int]:
    counts = {}
    for table in _tables(cursor, vendor):
        cursor.execute(f"SELECT count(*) FROM {_quoted(table)}")  # noqa: S608 - catalogue names
        counts[table] = int(cursor.fetchone()[0])
    return counts


def _triggers(cursor: Any, vendor: str) -> list[list[str]]:
    if vendor == "postgresql":
        cursor.execute(
            "SELECT c.relname, t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE NOT t.tgisinternal AND n.nspname = current_schema() ORDER BY 1, 2"
        )
    else:
        cursor.execute(
            "SELECT tbl_name, name FROM sqlite_master WHERE type = 'trigger' ORDER BY 1, 2"
        )
    return [[row[0], row[1]] for row in cursor.fetchall()]


def _migrations(cursor: Any) -> list[list[str]]:
    cursor.execute("SELECT app, name FROM django_migrations ORDER BY app, name")
    return [[row[0], row[1]] for row in cursor.fetchall()]


def _inventory_queries() -> list[tuple[str, str]]:
    """(kind, SELECT key, size, sha256) for every kind of stored object a row refers to."""
    from transfers.models import Instance, MediaExport, Report

    instance, report, export = (m._meta.db_table for m in (Instance, Report, MediaExport))
    return [
        ("instance", f"SELECT storage_key, size_bytes, sha256 FROM {instance} ORDER BY id"),  # noqa: S608
        (
            "report",
            f"SELECT storage_key, size_bytes, '' FROM {report} WHERE storage_key <> '' ORDER BY id",  # noqa: S608
        ),
        (
            "disc_image",
            f"SELECT storage_key, NULL, '' FROM {export} WHERE storage_key <> '' ORDER BY id",  # noqa: S608
        ),
    ]


def _inventory_write(open_cursor: Callable[[], Any], path: Path) -> dict[str, Any]:
    """Write the inventory (gzip'd JSON lines) from the database; returns its totals."""
    totals: dict[str, Any] = {"objects": 0, "bytes": 0, "by_kind": {}}
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=6) as out:
        for kind, query in _inventory_queries():
            cursor = open_cursor()
            cursor.execute(query)
            count = size_total = 0
            while rows := cursor.fetchmany(5000):
                for key, size, sha256 in rows:
                    out.write(
                        json.dumps(
                            {"kind": kind, "key": key, "size": size, "sha256": sha256},
                            separators=(",", ":"),
                        )
                        + "\n"
                    )
                    count += 1
                    size_total += size or 0
            cursor.close()
            totals["by_kind"][kind] = {"objects": count, "bytes": size_total}
            totals["objects"] += count
            totals["bytes"] += size_total
    return totals


def _pg_environment() -> dict[str, str]:
    """libpq's environment for the default database: the password travels in PGPASSWORD (seen
    only by this user's processes), never on a command line."""
    db = connection.settings_dict
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    for key, variable in (
        ("HOST", "PGHOST"),
        ("PORT", "PGPORT"),
        ("USER", "PGUSER"),
        ("PASSWORD", "PGPASSWORD"),
        ("NAME", "PGDATABASE"),
    ):
        if db.get(key):
            env[variable] = str(db[key])
    for option, value in (db.get("OPTIONS") or {}).items():
        if option in _PG_OPTIONS and value not in (None, ""):
            env[_PG_OPTIONS[option]] = str(value)
    return env


def _program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BackupError(
            f"{name} is not installed (Debian: postgresql-client, of the server's major version"
            " or newer)."
        )
    return path


def _run(args: list[str], *, what: str) -> str:
    done = subprocess.run(  # noqa: S603 - our own arguments, no shell
        args, env=_pg_environment(), capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise BackupError(f"{what} failed: {_tail(done.stderr)}")
    return done.stdout


def _tail(text: str, lines: int = 6) -> str:
    return " / ".join(line.strip() for line in text.strip().splitlines()[-lines:]) or "no message"


# --- backup --------------------------------------------------------------------------------------


@dataclass
class BackupMade:
    path: Path
    bytes: int
    sha256: str
    encrypted: bool
    manifest: dict[str, Any]


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(READ_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _destination(target: Path, *, encrypted: bool, now: datetime) -> Path:
    if target.is_dir():
        suffix = ".tar.enc" if encrypted else ".tar"
        target = target / f"relay-backup-{now:%Y%m%dT%H%M%SZ}{suffix}"
    if target.exists() or target.is_symlink():
        raise BackupError(f"{target} already exists: a backup never overwrites a file.")
    if not target.parent.is_dir():
        raise BackupError(f"The folder {target.parent} does not exist.")
    return target


def _database_parts_postgresql(work: Path) -> dict[str, Any]:
    """pg_dump, the counts, the triggers, the migrations and the inventory, in one snapshot."""
    pg_dump = _program("pg_dump")
    version = _run([pg_dump, "--version"], what="pg_dump --version").strip()
    connection.ensure_connection()
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            cursor.execute("SELECT pg_export_snapshot(), current_setting('server_version')")
            snapshot, server = cursor.fetchone()
        # The snapshot is exported while this transaction stays open: pg_dump sees exactly what
        # the counts and the inventory below see.
        _run(
            [
                pg_dump, "--format=custom", "--no-password", f"--snapshot={snapshot}",
                f"--file={work / DUMP_POSTGRESQL}",
            ],
            what="pg_dump",
        )  # fmt: skip
        with connection.cursor() as cursor:
            facts = {
                "counts": _counts(cursor, "postgresql"),
                "triggers": _triggers(cursor, "postgresql"),
                "migrations": _migrations(cursor),
            }
        raw = connection.connection
        names = iter(range(1_000_000))
        facts["inventory"] = _inventory_write(
            lambda: raw.cursor(name=f"relay_inventory_{next(names)}"), work / INVENTORY
        )
    facts["database"] = {"vendor": "postgresql", "server_version": server, "dump_tool": version}
    return facts


def _database_parts_sqlite(work: Path) -> dict[str, Any]:
    source_path = connection.settings_dict["NAME"]
    copy_path = work / DUMP_SQLITE
    source = sqlite3.connect(source_path, timeout=30)
    copy = sqlite3.connect(copy_path)
    try:
        source.backup(copy)  # one step: a consistent copy even while Relay writes
        copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        cursor = copy.cursor()
        facts = {
            "counts": _counts(cursor, "sqlite"),
            "triggers": _triggers(cursor, "sqlite"),
            "migrations": _migrations(cursor),
        }
        facts["inventory"] = _inventory_write(copy.cursor, work / INVENTORY)
    finally:
        copy.close()
        source.close()
    facts["database"] = {
        "vendor": "sqlite",
        "server_version": sqlite3.sqlite_version,
        "dump_tool": "sqlite3 online backup API",
    }
    return facts


def _storage_description() -> dict[str, str]:
    storage = storages["default"]
    described = {"backend": f"{type(storage).__module__}.{type(storage).__name__}"}
    for attribute in ("bucket_name", "location"):
        value = getattr(storage, attribute, "")
        if value:
            described[attribute] = str(value)
    return described


def backup_make(*, target: Path, passphrase: str | None = None) -> BackupMade:
    """Write a backup of the default database to `target` (a file, or a folder to name one in)."""
    vendor = _vendor()
    now = datetime.now(UTC)
    destination = _destination(target, encrypted=passphrase is not None, now=now)
    # Work next to the destination (its file system has the room, and the last step is a link),
    # in a folder only this user may enter.
    work = Path(tempfile.mkdtemp(prefix=".relay-backup-", dir=destination.parent))
    try:
        if vendor == "postgresql":
            facts = _database_parts_postgresql(work)
        else:
            facts = _database_parts_sqlite(work)
        dump = PARTS[vendor]
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "created_at": now.isoformat(timespec="seconds").replace("+00:00", "Z"),
            "host": socket.gethostname(),
            "database": facts["database"],
            "migrations": facts["migrations"],
            "counts": facts["counts"],
            "triggers": facts["triggers"],
            "inventory": facts["inventory"],
            "storage": _storage_description(),
            "parts": {
                name: {"bytes": (work / name).stat().st_size, "sha256": _sha256_file(work / name)}
                for name in (dump, INVENTORY)
            },
        }
        archive = work / "archive"
        fd = os.open(archive, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            sink: IO[bytes] = _Sealer(out, passphrase) if passphrase else out  # type: ignore[assignment]
            with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                _tar_add(tar, MANIFEST, io.BytesIO(_manifest_bytes(manifest)), now)
                for name in (dump, INVENTORY):
                    with (work / name).open("rb") as part:
                        _tar_add(tar, name, part, now)
            if passphrase:
                sink.close()
            out.flush()
            os.fsync(out.fileno())
        _publish(archive, destination)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return BackupMade(
        path=destination,
        bytes=destination.stat().st_size,
        sha256=_sha256_file(destination),
        encrypted=passphrase is not None,
        manifest=manifest,
    )


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def _tar_add(tar: tarfile.TarFile, name: str, data: IO[bytes], now: datetime) -> None:
    info = tarfile.TarInfo(name)
    data.seek(0, os.SEEK_END)
    info.size = data.tell()
    data.seek(0)
    info.mode = 0o600
    info.mtime = int(now.timestamp())
    tar.addfile(info, data)


def _publish(archive: Path, destination: Path) -> None:
    """Give the finished file its name, never replacing one (a link fails if the name exists)."""
    try:
        os.link(archive, destination)
    except FileExistsError:
        raise BackupError(
            f"{destination} already exists: a backup never overwrites a file."
        ) from None
    except OSError:
        # A file system without hard links: an exclusive create and a copy.
        fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out, archive.open("rb") as source:
            shutil.copyfileobj(source, out, READ_BLOCK)
            out.flush()
            os.fsync(out.fileno())
    folder = os.open(destination.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def backup_audit(made: BackupMade) -> None:
    """The BACKUP audit event, in the live database: a copy of everyone's data left."""
    from portal.audit import audit_record
    from portal.models import AuditAction

    counts = made.manifest["counts"]
    audit_record(
        action=AuditAction.BACKUP,
        detail={
            "file": made.path.name,
            "folder": str(made.path.parent),
            "sha256": made.sha256,
            "bytes": made.bytes,
            "encrypted": made.encrypted,
            "studies": counts.get("transfers_study", 0),
            "instances": counts.get("transfers_instance", 0),
            "by": _operator(),
        },
    )


def _operator() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


# --- reading a backup ----------------------------------------------------------------------------


@dataclass
class BackupRead:
    """A backup file read whole and checked, its parts in a private folder."""

    path: Path
    sha256: str
    encrypted: bool
    manifest: dict[str, Any]
    folder: Path

    @property
    def dump(self) -> Path:
        return self.folder / PARTS[self.manifest["database"]["vendor"]]

    @property
    def inventory(self) -> Path:
        return self.folder / INVENTORY


class _Hashing(io.RawIOBase):
    """Reads through, hashing the raw file as it goes (the SHA-256 of the backup file)."""

    def __init__(self, source: IO[bytes]) -> None:
        super().__init__()
        self._source = source
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._source.read(len(buffer))
        self.digest.update(data)
        buffer[: len(data)] = data
        return len(data)


def backup_read(path: Path, *, folder: Path, passphrase: str | None = None) -> BackupRead:
    """Read and check the whole backup file into `folder`; BackupError if anything is wrong."""
    try:
        raw = path.open("rb")
    except OSError as exc:
        raise BackupError(f"Cannot read {path}: {exc.strerror}.") from None
    with raw:
        sealed = raw.read(len(MAGIC)) == MAGIC
        raw.seek(0)
        if sealed and passphrase is None:
            raise BackupError("The backup is encrypted: give its --passphrase-file.")
        hashing = _Hashing(raw)
        buffered = io.BufferedReader(hashing, READ_BLOCK)
        stream: IO[bytes] = (
            io.BufferedReader(_Opener(buffered, passphrase), READ_BLOCK)  # type: ignore[arg-type]
            if sealed and passphrase
            else buffered
        )
        found: dict[str, tuple[int, str]] = {}
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    if member.name in found or member.name not in (
                        MANIFEST, DUMP_POSTGRESQL, DUMP_SQLITE, INVENTORY,
                    ) or not member.isfile():  # fmt: skip
                        raise BackupError(
                            f"{path} is not a Relay backup (it holds {member.name!r})."
                        )
                    found[member.name] = _extract(tar, member, folder / member.name)
            # Read to the very end: the whole file is hashed, and a sealed one fully checked.
            while stream.read(READ_BLOCK):
                pass
        except (tarfile.TarError, EOFError) as exc:
            raise BackupError(
                f"{path} is cut short or damaged ({exc}); nothing was changed."
            ) from None
    if MANIFEST not in found:
        raise BackupError(f"{path} is not a Relay backup (no {MANIFEST}).")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (ValueError, UnicodeDecodeError):
        raise BackupError(f"The manifest of {path} is damaged; nothing was changed.") from None
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{path} is not a Relay backup.")
    if manifest.get("version") != VERSION:
        raise BackupError(
            f"{path} is a version {manifest.get('version')} backup; this Relay reads version"
            f" {VERSION}."
        )
    for name, expected in manifest["parts"].items():
        if name not in found:
            raise BackupError(
                f"{path} lacks its {name}: cut short or damaged; nothing was changed."
            )
        size, sha256 = found[name]
        if size != expected["bytes"] or sha256 != expected["sha256"]:
            raise BackupError(
                f"The {name} in {path} does not match the checksum its manifest records"
                " (damaged or altered); nothing was changed."
            )
    return BackupRead(
        path=path,
        sha256=hashing.digest.hexdigest(),
        encrypted=sealed,
        manifest=manifest,
        folder=folder,
    )


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> tuple[int, str]:
    source = tar.extractfile(member)
    assert source is not None
    digest = hashlib.sha256()
    size = 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        while block := source.read(READ_BLOCK):
            digest.update(block)
            size += len(block)
            out.write(block)
    if size != member.size:
        raise BackupError(f"The {member.name} in the backup is cut short; nothing was changed.")
    return size, digest.hexdigest()


# --- restore -------------------------------------------------------------------------------------


@dataclass
class MigrationState:
    unknown: list[str]  # applied in the backup, unknown to this Relay: refused
    pending: list[str]  # this Relay's, not applied in the backup: `migrate` after the restore


def migration_state(applied: Iterable[Iterable[str]]) -> MigrationState:
    """The backup's applied migrations against this Relay's code."""
    done = {tuple(pair) for pair in applied}
    loader = MigrationLoader(None, ignore_no_migrations=True)
    known = set(loader.disk_migrations)
    unknown = sorted(f"{app}.{name}" for app, name in done - known)
    pending = []
    for node in loader.graph.nodes:
        if node in done:
            continue
        replaces = getattr(loader.graph.nodes[node], "replaces", None) or []
        if replaces and all(tuple(r) in done for r in replaces):
            continue  # a squash of migrations the backup has applied
        pending.append(f"{node[0]}.{node[1]}")
    return MigrationState(unknown=unknown, pending=sorted(pending))


def database_tables() -> list[str]:
    """The tables of the default database (in its current schema on PostgreSQL)."""
    vendor = _vendor()
    if vendor == "sqlite" and not Path(connection.settings_dict["NAME"]).exists():
        return []  # nothing there yet: do not make the file just to look
    with connection.cursor() as cursor:
        return _tables(cursor, vendor)


def database_describe() -> str:
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"SQLite file {db['NAME']}"
    return f"PostgreSQL database {db['NAME']} on {db.get('HOST') or 'the local socket'}"


@dataclass
class Loaded:
    seconds: float
    tables: int
    rows: int
    # (table, expected, found) for every table whose rows differ from the manifest's count
    count_mismatches: list[tuple[str, int, int | None]] = field(default_factory=list)
    triggers_missing: list[str] = field(default_factory=list)


def restore_load(backup: BackupRead, *, replace: bool = False) -> Loaded:
    """Load a checked backup into the default database; refuses one that holds tables unless
    `replace`. Checks every table's rows and the triggers afterwards."""
    vendor = _vendor()
    source = backup.manifest["database"]["vendor"]
    if source != vendor:
        raise BackupError(
            f"The backup is of a {source} database; this Relay's is {vendor}. Restore it into"
            f" {source} (DATABASE_URL)."
        )
    try:
        tables = database_tables()
    except DatabaseError as exc:
        raise BackupError(f"Cannot reach the {database_describe()}: {exc}".strip()) from None
    if tables and not replace:
        raise BackupError(
            f"The {database_describe()} is not empty ({len(tables)} tables, such as"
            f" {', '.join(tables[:3])}): restore loads into an empty database. "
            + (
                "Make a new one (createdb)"
                if vendor == "postgresql"
                else "Name a new file in DATABASE_URL"
            )
            + ", or pass --replace to drop everything in this one first."
        )
    connection.close()
    started = time.monotonic()
    if vendor == "postgresql":
        _load_postgresql(backup.dump, replace=replace)
    else:
        _load_sqlite(backup.dump)
    connection.close()
    seconds = time.monotonic() - started
    with connection.cursor() as cursor:
        counts = _counts(cursor, vendor)
        triggers = {tuple(t) for t in _triggers(cursor, vendor)}
    expected: dict[str, int] = backup.manifest["counts"]
    loaded = Loaded(seconds=seconds, tables=len(counts), rows=sum(counts.values()))
    for table, rows in expected.items():
        if counts.get(table) != rows:
            loaded.count_mismatches.append((table, rows, counts.get(table)))
    loaded.triggers_missing = [
        f"{table}.{name}"
        for table, name in backup.manifest["triggers"]
        if (table, name) not in triggers
    ]
    return loaded


def _load_postgresql(dump: Path, *, replace: bool) -> None:
    """pg_restore's SQL into psql, all in one transaction: the database gets all or nothing."""
    pg_restore, psql = _program("pg_restore"), _program("psql")
    before: list[str] = []
    if replace:
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_schema()")
            schema = cursor.fetchone()[0]
        connection.close()
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", schema or ""):
            raise BackupError(f"Cannot replace the schema {schema!r}: drop it by hand.")
        before = ["-c", f"DROP SCHEMA {schema} CASCADE; CREATE SCHEMA {schema};"]
    env = _pg_environment()
    with tempfile.TemporaryFile() as restore_err, tempfile.TemporaryFile() as psql_err:
        producer = subprocess.Popen(  # noqa: S603 - our own arguments, no shell
            # Objects belong to whoever restores (the owner role that runs migrate); grants are
            # made again afterwards as after every migrate (README, "Database roles").
            [pg_restore, "--no-owner", "--no-privileges", "--file=-", str(dump)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=restore_err,
        )
        consumer = subprocess.Popen(  # noqa: S603
            [
                psql, "--no-psqlrc", "--quiet", "--single-transaction",
                "--set=ON_ERROR_STOP=1", "--set=VERBOSITY=terse", "--set=SHOW_CONTEXT=never",
                *before, "--file=-",
            ],
            env=env,
            stdin=producer.stdout,
            stdout=subprocess.DEVNULL,
            stderr=psql_err,
        )  # fmt: skip
        assert producer.stdout is not None
        producer.stdout.close()  # psql holds it now; pg_restore sees a closed pipe if psql stops
        consumer.wait()
        producer.wait()
        if consumer.returncode != 0:
            psql_err.seek(0)
            raise BackupError(
                "Loading the dump failed and was rolled back, nothing was changed: "
                + _tail(psql_err.read().decode(errors="replace"), 3)
            )
        if producer.returncode != 0:
            restore_err.seek(0)
            raise BackupError(
                "pg_restore failed: " + _tail(restore_err.read().decode(errors="replace"), 3)
            )


def _load_sqlite(dump: Path) -> None:
    target = connection.settings_dict["NAME"]
    if not Path(target).exists():
        # A new file holds every patient's data: its owner's only, as the backup was.
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    source = sqlite3.connect(f"file:{dump}?mode=ro", uri=True)
    destination = sqlite3.connect(target, timeout=30)
    try:
        source.backup(destination)  # one step: the whole file or, on failure, the old one
    except sqlite3.Error as exc:
        raise BackupError(f"Loading the SQLite copy failed: {exc}.") from None
    finally:
        destination.close()
        source.close()


def restore_audit(backup: BackupRead, *, check: StorageCheck | None) -> bool:
    """The RESTORE audit event, in the restored database's own trail; False if it could not be
    written (the schema is older than this Relay: it is not migrated yet)."""
    from portal.audit import audit_record
    from portal.models import AuditAction, Outcome

    detail: dict[str, Any] = {
        "file": backup.path.name,
        "sha256": backup.sha256,
        "backup_created_at": backup.manifest["created_at"],
        "backup_host": backup.manifest.get("host", ""),
        "by": _operator(),
    }
    if check is not None:
        detail.update(check.as_detail())
    try:
        with transaction.atomic():
            audit_record(
                action=AuditAction.RESTORE,
                outcome=Outcome.FAILURE if check is not None and check.failed else Outcome.SUCCESS,
                detail=detail,
            )
    except DatabaseError:
        return False
    return True


# --- the storage against the inventory -----------------------------------------------------------


@dataclass
class StorageCheck:
    checked: int = 0
    checked_bytes: int = 0
    hashed: bool = False
    # problem -> count, over the objects the database cannot do without
    problems: dict[str, int] = field(default_factory=dict)
    # disc images (made again on request) that are missing
    optional_missing: int = 0
    problems_file: Path | None = None

    @property
    def failed(self) -> bool:
        return bool(self.problems)

    @property
    def missing(self) -> int:
        return self.problems.get("missing", 0)

    def as_detail(self) -> dict[str, Any]:
        return {
            "objects_checked": self.checked,
            "objects_missing": self.missing,
            "objects_wrong": sum(n for p, n in self.problems.items() if p != "missing"),
            "hashed": self.hashed,
        }


def inventory_entries(path: Path) -> Iterator[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            yield json.loads(line)


def _object_check(storage: Storage, entry: dict[str, Any], verify: bool) -> str | None:
    """None when the object is there as recorded; else what is wrong with it."""
    from transfers.integrity import IntegrityError, verified_open

    key = entry["key"]
    try:
        if verify and entry["kind"] in REQUIRED_KINDS:
            with verified_open(storage, key, size=entry["size"], sha256=entry["sha256"]) as reader:
                reader.verify()
            return None
        size = storage.size(key)
    except FileNotFoundError:
        return "missing"
    except IntegrityError:
        return "damaged"
    except Exception:  # noqa: BLE001 - S3 says "not found" with its own exceptions
        try:
            there = storage.exists(key)
        except Exception:  # noqa: BLE001
            return "unreadable"
        return "unreadable" if there else "missing"
    if entry["size"] is not None and size != entry["size"]:
        return "wrong size"
    return None


def storage_check(
    inventory: Path,
    *,
    problems_file: Path,
    verify_hashes: bool = False,
    storage: Storage | None = None,
) -> StorageCheck:
    """Check every object of the inventory in the storage; the problems (with their keys) go to
    `problems_file` (0600), made only when there is one."""
    storage = storage or storages["default"]
    check = StorageCheck(hashed=verify_hashes)
    out: IO[str] | None = None

    def problem_write(entry: dict[str, Any], problem: str) -> None:
        nonlocal out
        if out is None:
            fd = os.open(problems_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            out = os.fdopen(fd, "w")
            out.write("# problem\tkind\tstorage key (names the study and series UIDs)\n")
            check.problems_file = problems_file
        out.write(f"{problem}\t{entry['kind']}\t{entry['key']}\n")

    try:
        with ThreadPoolExecutor(max_workers=CHECK_THREADS) as pool:
            for batch in _batches(inventory_entries(inventory), 2000):
                results = pool.map(lambda e: _object_check(storage, e, verify_hashes), batch)
                for entry, problem in zip(batch, results, strict=True):
                    check.checked += 1
                    check.checked_bytes += entry["size"] or 0
                    if problem is None:
                        continue
                    if entry["kind"] not in REQUIRED_KINDS:
                        if problem == "missing":
                            check.optional_missing += 1
                        continue
                    check.problems[problem] = check.problems.get(problem, 0) + 1
                    problem_write(entry, problem)
    finally:
        if out is not None:
            out.close()
    return check


def _batches(items: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def problems_file_for(backup: Path, folder: Path | None = None) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return (folder or backup.parent) / f"{backup.name}.storage-problems-{stamp}.txt"


def settings_summary() -> str:
    """Where the restored database's images are looked for."""
    described = _storage_description()
    where = described.get("bucket_name") or described.get("location") or "?"
    kind = "bucket" if "bucket_name" in described else "folder"
    return f"{kind} {where}"
