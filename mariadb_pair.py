"""A MariaDB primary and a replica of it, started for tests and benchmarks; not part of the service.

    with MariaDBPair() as pair:
        engine = create_async_engine(pair.primary_url, isolation_level="AUTOCOMMIT")
        ...
        pair.stop_replica_sql_thread()  # the replica falls behind, on purpose

Each server is a `mariadbd` of its own (Debian's MariaDB 10.11, or any on PATH), started with
--no-defaults so that no option file of the machine's own server is read, in a temporary folder
that holds its data, socket, pid file and error log, listening on 127.0.0.1 on a port the kernel
picked. The primary writes a binary log; the replica follows it by GTID (MASTER_USE_GTID =
slave_pos) and is read-only. Root signs in on both without a password. stop() ends both
processes by their ids and deletes the folder; the context manager calls it whatever happens.
The admin statements here go over each server's unix socket with PyMySQL, so the class is
plain synchronous code, usable from a benchmark script as from a test.
"""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

PRIMARY_SERVER_ID = 1
REPLICA_SERVER_ID = 2
# The account the replica signs in to the primary with: replication is all it may do.
REPLICATION_USER = "replication"
# Small buffers, so that creating and starting a server is quick: it holds a few rows.
INNODB_SIZES = ["--innodb-buffer-pool-size=16M", "--innodb-log-file-size=4M"]
# No fsync at commit: a test kills a process, never the machine, so what a commit wrote to the
# operating system survives (innodb_flush_log_at_trx_commit=2).
SERVER_OPTIONS = [
    "--bind-address=127.0.0.1",
    "--skip-name-resolve",
    *INNODB_SIZES,
    "--innodb-flush-log-at-trx-commit=2",
    "--gtid-strict-mode=ON",
]
# Row-based: the replica applies the rows the primary changed, and never runs a statement again.
PRIMARY_OPTIONS = [f"--server-id={PRIMARY_SERVER_ID}", "--log-bin=binlog", "--binlog-format=ROW"]
REPLICA_OPTIONS = [f"--server-id={REPLICA_SERVER_ID}", "--read-only=ON", "--relay-log=relay"]
# mariadbd refuses to run as root unless it is told to, and the test session may be root.
RUN_AS = ["--user=root"] if os.geteuid() == 0 else []
# The kernel kills mariadbd when the thread that started it ends, so that a test run killed
# before it could stop its servers leaves none behind; setpriv then runs mariadbd in its place,
# under the same process id. Without setpriv (util-linux), only stop() ends them.
SETPRIV = shutil.which("setpriv")
ORPHAN_GUARD = [SETPRIV, "--pdeathsig", "KILL"] if SETPRIV else []


def free_port() -> int:
    """A port no one listens on, picked by the kernel, for a server to listen on next."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def program(name: str) -> str | None:
    """The path of a MariaDB program: on PATH, or in the sbin folders a user's PATH may lack."""
    return shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")


class MariaDBServer:
    """One mariadbd on a data folder and a port of its own; start() again after kill() or stop()."""

    def __init__(self, mariadbd: str, folder: Path, name: str, options: list[str]) -> None:
        self.name = name
        self.datadir = folder / name
        self.socket = folder / f"{name}.sock"
        self.error_log = folder / f"{name}.err"
        self.port = free_port()
        # --no-defaults must come first; the same command each time keeps the data folder and port.
        self.command = [
            *ORPHAN_GUARD, mariadbd, "--no-defaults", *RUN_AS, f"--datadir={self.datadir}", f"--port={self.port}",
            f"--socket={self.socket}", f"--pid-file={folder / name}.pid", f"--log-error={self.error_log}",
            *SERVER_OPTIONS, *options,
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None
        # NullPool: an admin connection never outlives its statement, so none is left dead by kill().
        # The timeouts make a server that stopped answering an error here rather than a hung test run.
        self.admin = create_engine(
            f"mysql+pymysql://root@/?unix_socket={self.socket}",
            poolclass=NullPool,
            isolation_level="AUTOCOMMIT",
            connect_args={"connect_timeout": 10, "read_timeout": 60},
        )

    def url(self, database: str, driver: str = "aiomysql") -> str:
        """The SQLAlchemy URL of a database on this server, over TCP as the service connects."""
        return f"mysql+{driver}://root@127.0.0.1:{self.port}/{database}"

    def start(self, within: float = 30) -> None:
        """Start mariadbd and wait until it answers; raise with its error log if it does not."""
        # Into the error log too: what mariadbd says before it opens that log (it refuses to run as root, ...).
        with self.error_log.open("ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=log)
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log()}")
            if self.accepts_connections():
                self.query("SELECT 1")
                return
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"{self.name} did not answer within {within} s:\n{self.log()}")

    def accepts_connections(self) -> bool:
        """Whether the server listens on its socket yet (or still), asked without a driver."""
        # PyMySQL leaves the socket of a refused connection open, which -W error turns into a failure.
        with socket.socket(socket.AF_UNIX) as sock:
            try:
                sock.connect(str(self.socket))
            except OSError:
                return False
            return True

    def query(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        """Run one statement as root; return its rows as dicts (none for a statement without)."""
        with self.admin.connect() as conn:
            result = conn.execute(text(sql), params)
            return [dict(row) for row in result.mappings()] if result.returns_rows else []

    def value(self, sql: str, **params: Any) -> Any:
        """Run one statement that selects one value; return it."""
        [row] = self.query(sql, **params)
        [value] = row.values()
        return value

    def kill(self) -> None:
        """End the process with SIGKILL, as a crash or the kernel's OOM killer would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self, within: float = 30) -> None:
        """End the process with SIGTERM, as a clean shutdown; SIGKILL if it has not ended within that time."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGCONT)  # a paused process would not act on SIGTERM
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(within)
        except subprocess.TimeoutExpired:
            self.kill()

    def log(self) -> str:
        return self.error_log.read_text(errors="replace") if self.error_log.exists() else ""


class MariaDBPair:
    """A primary and a replica that follows it by GTID, each a mariadbd in one temporary folder."""

    def __init__(self, database: str = "test", gtid_domain_id: int = 0) -> None:
        install, mariadbd = program("mariadb-install-db"), program("mariadbd")
        if install is None or mariadbd is None:
            raise FileNotFoundError("mariadbd and mariadb-install-db are not on PATH (Debian: mariadb-server)")
        self.install = install
        self.database = database
        self.gtid_domain_id = gtid_domain_id
        self.folder = Path(tempfile.mkdtemp(prefix="mariadb-pair-"))
        primary_options = [*PRIMARY_OPTIONS, f"--gtid-domain-id={gtid_domain_id}"]
        self.primary = MariaDBServer(mariadbd, self.folder, "primary", primary_options)
        self.replica = MariaDBServer(mariadbd, self.folder, "replica", REPLICA_OPTIONS)

    @property
    def primary_url(self) -> str:
        return self.primary.url(self.database)

    @property
    def replica_url(self) -> str:
        return self.replica.url(self.database)

    def __enter__(self) -> "MariaDBPair":
        """Start the pair; stop it again (and delete its folder) if it does not start."""
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Create both data folders, start both servers, replicate, and create the database on the primary."""
        # normal: root signs in without a password, not only as the system's root over the socket.
        subprocess.run(
            [
                self.install, "--no-defaults", f"--datadir={self.primary.datadir}",
                "--auth-root-authentication-method=normal", "--skip-test-db", "--skip-name-resolve", *INNODB_SIZES,
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        # The replica starts from the same system tables; it gets everything else from the binary log.
        shutil.copytree(self.primary.datadir, self.replica.datadir)
        self.primary.start()
        self.replica.start()
        # Replicated too, so the replica has it as it would need it if it were promoted.
        self.primary.query(f"CREATE USER {REPLICATION_USER}@'127.0.0.1'")
        self.primary.query(f"GRANT REPLICATION SLAVE ON *.* TO {REPLICATION_USER}@'127.0.0.1'")
        self.replica.query(
            f"CHANGE MASTER TO MASTER_HOST = '127.0.0.1', MASTER_PORT = {self.primary.port}, "
            f"MASTER_USER = '{REPLICATION_USER}', MASTER_USE_GTID = slave_pos, MASTER_CONNECT_RETRY = 1"
        )
        self.replica.query("START REPLICA")
        self.primary.query(f"CREATE DATABASE `{self.database}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
        self.wait_replica_caught_up()

    def stop(self) -> None:
        """Stop both servers by their process ids and delete the folder."""
        for server in (self.replica, self.primary):
            server.stop()
            server.admin.dispose()
        shutil.rmtree(self.folder, ignore_errors=True)

    def wait_replica_caught_up(self, within: float = 10) -> None:
        """Wait until the replica has applied everything the primary has written; TimeoutError if it has not."""
        position = self.primary.value("SELECT @@gtid_binlog_pos")
        if self.replica.value("SELECT MASTER_GTID_WAIT(:position, :within)", position=position, within=within) != 0:
            applied = self.replica.value("SELECT @@gtid_slave_pos")
            raise TimeoutError(f"the replica applied {applied!r} of {position!r} within {within} s")

    def replica_status(self) -> dict[str, Any]:
        """The replica's one row of SHOW REPLICA STATUS (Seconds_Behind_Master, Slave_SQL_Running, ...)."""
        [status] = self.replica.query("SHOW REPLICA STATUS")
        return status

    def stop_replica_sql_thread(self) -> None:
        """Stop applying what the replica receives: it falls behind by every write from now on."""
        self.replica.query("STOP REPLICA SQL_THREAD")

    def start_replica_sql_thread(self) -> None:
        self.replica.query("START REPLICA SQL_THREAD")

    def set_replica_delay(self, seconds: int) -> None:
        """Apply each write on the replica no sooner than that many seconds after the primary wrote it (0: at once)."""
        # CHANGE MASTER refuses to run while either replication thread runs (error 1198).
        self.replica.query("STOP REPLICA")
        self.replica.query(f"CHANGE MASTER TO MASTER_DELAY = {int(seconds)}")
        self.replica.query("START REPLICA")

    def kill_replica(self) -> None:
        """SIGKILL the replica's mariadbd: its connections drop and its port refuses."""
        self.replica.kill()

    def pause_replica(self) -> None:
        """SIGSTOP the replica's mariadbd: its port still accepts connections, but nothing is answered."""
        assert self.replica.process is not None
        self.replica.process.send_signal(signal.SIGSTOP)

    def resume_replica(self) -> None:
        assert self.replica.process is not None
        self.replica.process.send_signal(signal.SIGCONT)

    def restart_replica(self) -> None:
        """Start the replica again on its data folder and port (stopped first if it runs); it resumes replicating."""
        self.replica.stop()
        self.replica.start()
