"""One-command orchestrator: check, start, supervise and stop the whole local system.

Starts mock_backends.py, load_balancer.py and the API (``app.py``, or gunicorn with
``--workers``) as child processes with ``sys.executable``; it imports none of them, so a
broken component is a clear message here, not a traceback. Each child runs in its own
process group, its output is prefixed with its name, a child that dies is restarted with
backoff, and SIGINT/SIGTERM stop every group (TERM, then KILL after a grace period).

Restarts wait 1 s, doubling to 30 s, at most 5 within 60 s; then the API's loss stops the
whole system (exit 1) and any other component is left down. RUN_SYSTEM_BACKOFF_BASE sets
the first delay (tests shorten it).
"""

from __future__ import annotations

import argparse
import ast
import collections
import ctypes
import dataclasses
import errno
import http.client
import importlib.util
import logging
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

log = logging.getLogger("run_system")

PROJECT_DIR = Path(__file__).resolve().parent
POLL_SECONDS = 0.1
GRACE_SECONDS = 10.0
OUTPUT_LINES_KEPT = 20
# PyPI names of modules whose import name differs, for the "pip install" hint.
PACKAGE_NAMES = {
    "jwt": "PyJWT",
    "flask_cors": "flask-cors",
    "flask_socketio": "Flask-SocketIO",
    "flask_limiter": "Flask-Limiter",
    "psycopg2": "psycopg2-binary",
    "socketio": "python-socketio",
    "prometheus_client": "prometheus-client",
}

HealthCheck = Callable[[], "str | None"]


class SetupError(Exception):
    """Something to fix before (or while) the system starts; its message is one line."""


@dataclasses.dataclass
class RestartPolicy:
    """Backoff of ``base`` seconds doubling up to ``cap``; at most ``limit`` restarts per ``window`` seconds."""

    base: float = 1.0
    cap: float = 30.0
    limit: int = 5
    window: float = 60.0
    clock: Callable[[], float] = time.monotonic
    history: collections.deque[float] = dataclasses.field(default_factory=collections.deque)

    def next_delay(self) -> float | None:
        """Seconds to wait before the next restart, or None when the restart budget is spent."""
        now = self.clock()
        while self.history and now - self.history[0] >= self.window:
            self.history.popleft()
        if len(self.history) >= self.limit:
            return None
        return min(self.base * 2 ** len(self.history), self.cap)

    def record(self) -> None:
        self.history.append(self.clock())


@dataclasses.dataclass
class Component:
    """One supervised child: how to start it, how to tell it is healthy, and its live state."""

    name: str
    argv: list[str]
    env: dict[str, str]
    health: HealthCheck
    urls: list[str]
    ports: list[int] = dataclasses.field(default_factory=list)
    port_flag: str = ""
    essential: bool = False
    after: tuple[str, ...] = ()  # components that must be healthy before this one starts
    process: subprocess.Popen[bytes] | None = None
    reader: threading.Thread | None = None
    output: collections.deque[str] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=OUTPUT_LINES_KEPT)
    )
    policy: RestartPolicy = dataclasses.field(default_factory=RestartPolicy)
    restart_at: float | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def last_output(self) -> str:
        lines = list(self.output)[-8:]
        return "; last output: " + " | ".join(lines) if lines else "; it printed nothing"


@dataclasses.dataclass
class Plan:
    """Everything decided from the flags and the environment before anything starts."""

    host: str
    components: list[Component]
    scripts: dict[str, Path]
    extra_modules: dict[str, str]
    database_url: str | None
    db_path: str
    redis_url: str | None
    cert_dir: Path | None
    notes: list[str]
    migrate_first: bool = False


# ---------------------------------------------------------------- addresses and health


def connect_host(host: str) -> str:
    """Where to reach a server bound to ``host``: a wildcard bind is reached over loopback."""
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # nosec B104: a lookup, not a bind


def url_for(scheme: str, host: str, port: int) -> str:
    shown = connect_host(host)
    return f"{scheme}://[{shown}]:{port}" if ":" in shown else f"{scheme}://{shown}:{port}"


def http_health(urls: Sequence[str], context: ssl.SSLContext | None = None) -> HealthCheck:
    """A check that every URL answers 200; proxies from the environment are bypassed."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)

    def check() -> str | None:
        for url in urls:
            try:
                with opener.open(url, timeout=2) as response:
                    if response.status != 200:
                        return f"{url} answered HTTP {response.status}"
            except urllib.error.HTTPError as exc:
                return f"{url} answered HTTP {exc.code}"
            except (OSError, ValueError, http.client.HTTPException) as exc:
                reason = getattr(exc, "reason", exc) or type(exc).__name__
                return f"{url} did not answer ({reason})"
        return None

    return check


def redis_health(host: str, port: int) -> HealthCheck:
    """A check that a Redis server answers PING."""

    def check() -> str | None:
        try:
            with socket.create_connection((host, port), timeout=2) as sock:
                sock.sendall(b"PING\r\n")
                reply = sock.recv(64)
        except OSError as exc:
            return f"redis at {host}:{port} did not answer ({exc.strerror or exc})"
        return None if reply.startswith(b"+PONG") else f"redis at {host}:{port} answered {reply[:40]!r}"

    return check


def port_problem(host: str, port: int, owner: str, flag: str) -> str | None:
    """Why ``owner`` cannot listen on host:port, as one line with the fix, or None."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror:
        return f"--host {host} is not an address of this machine"
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return (
                    f"port {port} on {host} is already in use (needed by {owner}): stop the process holding it "
                    f"(find it with: ss -ltnp 'sport = :{port}') or choose another port with {flag}"
                )
            return f"cannot listen on {host}:{port} for {owner}: {exc.strerror}"
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- dependency checks


def imported_modules(script: Path) -> dict[str, str]:
    """Third-party modules ``script`` and the project modules it imports need at import time.

    Only module-level imports count: imports inside ``try``/``if`` blocks or functions are
    optional or lazy, and the component reports those itself. Maps module -> importing file.
    """
    needed: dict[str, str] = {}
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path in seen or not path.exists():
            continue
        seen.add(path)
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue  # the child itself will show the error when it starts
        for node in tree.body:
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if (PROJECT_DIR / f"{top}.py").exists():
                    todo.append(PROJECT_DIR / f"{top}.py")
                elif top not in sys.stdlib_module_names and not (PROJECT_DIR / top).is_dir():
                    needed.setdefault(top, path.name)
    return needed


def missing_modules(needed: dict[str, str]) -> list[str]:
    problems = []
    for module, user in sorted(needed.items()):
        if importlib.util.find_spec(module) is None:
            package = PACKAGE_NAMES.get(module, module)
            problems.append(
                f"Python package {package} (module {module}, needed by {user}) is not installed in {sys.executable}: "
                f"run {sys.executable} -m pip install -r requirements.txt"
            )
    return problems


def sqlite_problem(db_path: str, source: str) -> str | None:
    """The SQLite file must be creatable/writable: its directory exists and is writable."""
    path = Path(db_path).expanduser().resolve()
    directory = path.parent
    if not directory.is_dir():
        return f"SQLite directory {directory} does not exist ({source}): create it or point {source} elsewhere"
    if not os.access(directory, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return f"SQLite database {path} is not writable ({source}): fix its permissions or point {source} elsewhere"
    return None


def database_problem(database_url: str | None, db_path: str) -> str | None:
    """Check the database the API will use; a server URL gets a real connection with a short timeout."""
    if not database_url:
        return sqlite_problem(db_path, "DB_PATH")
    if database_url.startswith("sqlite:///"):
        return sqlite_problem(database_url.removeprefix("sqlite:///"), "--database-url / DATABASE_URL")
    try:
        import sqlalchemy as sa
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
    except ImportError:
        return None  # reported by the import check
    try:
        url = sa.make_url(database_url)
    except ArgumentError:
        return f"--database-url / DATABASE_URL is not a valid SQLAlchemy URL: {database_url!r}"
    shown = url.render_as_string(hide_password=True)
    connect_args = {"connect_timeout": 3} if url.get_backend_name() in ("postgresql", "mysql") else {}
    try:
        engine = sa.create_engine(url, connect_args=connect_args, poolclass=sa.pool.NullPool)
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()
    except (NoSuchModuleError, ImportError) as exc:
        return f"no driver for {shown} ({exc}): run pip install -r requirements.txt"
    except SQLAlchemyError as exc:
        reason = next(
            (line.strip() for line in str(getattr(exc, "orig", None) or exc).splitlines() if line.strip()), ""
        )
        return (
            f"database {shown} is not reachable ({reason}): start it, fix --database-url / DATABASE_URL, "
            "or pass --skip-db"
        )
    return None


def redis_problem(redis_url: str) -> str | None:
    """A configured shared store must answer PING before the API relies on it."""
    try:
        import redis
    except ImportError:
        return None  # reported by the import check
    from redis_wire import SentinelResolver, SlotMap, parse_store_url

    try:
        spec = parse_store_url(redis_url)
        if spec.kind == "sentinel":
            SentinelResolver(spec).master()  # a master the sentinels name, and that says it is one
        elif spec.kind == "cluster":
            SlotMap(spec).refresh()
        else:
            redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2).ping()
    except (redis.RedisError, ValueError) as exc:
        return f"Redis at {redis_url} is not reachable ({exc}): start it or fix --redis / REDIS_URL"
    return None


def check_plan(plan: Plan, skip_db: bool) -> list[str]:
    """Every problem that would stop the system, one line each, cheapest checks first."""
    problems = [
        f"{script.name} is missing from {PROJECT_DIR}: the {name} component cannot start (restore it from git)"
        for name, script in plan.scripts.items()
        if not script.exists()
    ]
    needed: dict[str, str] = dict(plan.extra_modules)
    for script in plan.scripts.values():
        needed.update(imported_modules(script))
    problems += missing_modules(needed)
    problems += port_problems(plan)
    if problems:
        return problems
    if plan.cert_dir is not None and not os.access(nearest_existing(plan.cert_dir), os.W_OK):
        problems.append(f"certificate directory {plan.cert_dir} is not writable: pass --cert-dir DIR")
    starts_redis = any(component.name == "redis" for component in plan.components)
    if plan.redis_url and not starts_redis and (problem := redis_problem(plan.redis_url)):
        problems.append(problem)
    if not skip_db and (problem := database_problem(plan.database_url, plan.db_path)):
        problems.append(problem)
    return problems


def port_problems(plan: Plan) -> list[str]:
    owners: dict[int, str] = {}
    problems = []
    for component in plan.components:
        for port in component.ports:
            if port in owners:
                problems.append(f"port {port} is given to both {owners[port]} and {component.name}: use distinct ports")
                continue
            owners[port] = component.name
            if problem := port_problem(plan.host, port, component.name, component.port_flag):
                problems.append(problem)
    return problems


def nearest_existing(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


# ---------------------------------------------------------------- planning


def base_env(environ: dict[str, str]) -> dict[str, str]:
    env = dict(environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def plan_api_env(args: argparse.Namespace, env: dict[str, str], redis_url: str | None, notes: list[str]) -> None:
    """Settings only the API needs: mode, secrets, database, store and worker count."""
    if args.dev:
        env["FLASK_ENV"] = "development"
        if not env.get("ADMIN_TOKEN"):
            env["ADMIN_TOKEN"] = secrets.token_urlsafe(24)
            notes.append(f"dev ADMIN_TOKEN for this run (set ADMIN_TOKEN to choose one): {env['ADMIN_TOKEN']}")
    if not env.get("JWT_SECRET_KEY") and (env.get("FLASK_ENV") or "development") != "production":
        # One key for every worker and restart, so tokens stay valid across them.
        env["JWT_SECRET_KEY"] = secrets.token_urlsafe(48)
        notes.append("JWT_SECRET_KEY not set: using a random key for this run (tokens end when it stops)")
    if args.database_url:
        env["DATABASE_URL"] = args.database_url
    if redis_url:
        env["REDIS_URL"] = redis_url
    env["PORT"] = str(args.api_port)
    env["WEB_CONCURRENCY"] = str(args.workers or 1)


def plan_redis(args: argparse.Namespace, environ: dict[str, str]) -> tuple[str | None, Component | None]:
    """The shared store: --redis, then REDIS_URL, then (for --workers > 1) a redis-server we start."""
    url = args.redis or environ.get("REDIS_URL") or None
    if url or args.workers <= 1:
        return url, None
    binary = shutil.which("redis-server", path=environ.get("PATH"))
    if binary is None:
        raise SetupError(
            f"--workers {args.workers} needs a shared limiter store, but no Redis is configured and redis-server "
            "is not on PATH: pass --redis redis://HOST:6379/0 (or set REDIS_URL), or install Redis "
            "(apt-get install redis-server)"
        )
    port = free_port()
    component = Component(
        name="redis",
        argv=[binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        env=dict(environ),
        health=redis_health("127.0.0.1", port),
        urls=[f"redis://127.0.0.1:{port}/0"],
    )
    return component.urls[0], component


def api_component(args: argparse.Namespace, env: dict[str, str], cert_dir: Path | None) -> Component:
    port, scheme = args.api_port, "https" if cert_dir else "http"
    tls_args: list[str] = []
    if cert_dir is not None:
        cert, key = str(cert_dir / "cert.pem"), str(cert_dir / "key.pem")
        tls_args = ["--certfile", cert, "--keyfile", key] if args.workers else ["--ssl-cert", cert, "--ssl-key", key]
    if args.workers:
        argv = [sys.executable, "-m", "gunicorn", "--workers", str(args.workers), "--bind", f"{args.host}:{port}"]
        # No control socket: its default path ($HOME/.gunicorn/gunicorn.ctl) is shared by every gunicorn.
        argv += ["--pythonpath", str(PROJECT_DIR), "--graceful-timeout", "5", "--no-control-socket"]
        # Our settings file whatever the cwd: the pre-fork config check and the log redaction.
        argv += ["--config", str(PROJECT_DIR / "gunicorn.conf.py")]
        argv += [*tls_args, "app:app"]
    else:
        argv = [sys.executable, str(PROJECT_DIR / "app.py"), "--host", args.host, "--port", str(port), *tls_args]
    url = url_for(scheme, args.host, port)
    health = lazy_tls_health(f"{url}/health", cert_dir) if cert_dir else http_health([f"{url}/health"])
    return Component("api", argv, env, health, [url], [port], "--api-port", essential=True, after=("redis",))


def lazy_tls_health(url: str, cert_dir: Path) -> HealthCheck:
    """HTTPS health check trusting the dev certificate, loaded once it exists (after generation)."""
    checks: list[HealthCheck] = []

    def check() -> str | None:
        if not checks:
            checks.append(http_health([url], ssl.create_default_context(cafile=str(cert_dir / "cert.pem"))))
        return checks[0]()

    return check


def restart_backoff(environ: dict[str, str]) -> float:
    """First restart delay in seconds: RUN_SYSTEM_BACKOFF_BASE [1] (tests make it short)."""
    raw = environ.get("RUN_SYSTEM_BACKOFF_BASE") or "1"
    try:
        value = float(raw)
    except ValueError:
        raise SetupError(f"RUN_SYSTEM_BACKOFF_BASE must be a number of seconds, got {raw!r}") from None
    if not 0 < value <= 30:
        raise SetupError(f"RUN_SYSTEM_BACKOFF_BASE must be in (0, 30], got {raw!r}")
    return value


def build_plan(args: argparse.Namespace, environ: dict[str, str]) -> Plan:
    """Decide every child's command line and environment; nothing is started or written here."""
    notes: list[str] = []
    env = base_env(environ)
    redis_url, redis_component = plan_redis(args, env)
    cert_dir = Path(args.cert_dir) if args.ssl else None
    api_env = dict(env)
    plan_api_env(args, api_env, redis_url, notes)
    components = [redis_component] if redis_component else []
    scripts = {"api": PROJECT_DIR / "app.py"}
    backend_urls = [url_for("http", args.host, port) for port in args.backend_ports]
    if not args.no_backends:
        argv = [sys.executable, str(PROJECT_DIR / "mock_backends.py"), "--host", args.host]
        argv += ["--ports", ",".join(map(str, args.backend_ports))]
        health = http_health([f"{url}/health" for url in backend_urls])
        components.append(Component("backends", argv, env, health, backend_urls, args.backend_ports, "--backend-ports"))
        scripts["backends"] = PROJECT_DIR / "mock_backends.py"
    components.append(api_component(args, api_env, cert_dir))
    if not args.no_lb:
        lb_url = url_for("http", args.host, args.lb_port)
        argv = [sys.executable, str(PROJECT_DIR / "load_balancer.py"), "--host", args.host]
        argv += ["--port", str(args.lb_port), "--backends", ",".join(backend_urls)]
        if args.gateway:  # the balancer asks the API's decision endpoint before proxying
            decider = url_for("https" if cert_dir else "http", args.host, args.api_port) + "/forward_auth"
            argv += ["--forward-auth", decider]
            notes.append(f"gateway mode: try curl -i {lb_url}/ (401 without a key), then with -H 'X-API-Key: <key>'")
        health = http_health([f"{lb_url}/lb/health"])
        # After the backends, so its first health probe already finds them up.
        components.append(
            Component("lb", argv, env, health, [lb_url], [args.lb_port], "--lb-port", after=("backends",))
        )
        scripts["lb"] = PROJECT_DIR / "load_balancer.py"
    if args.workers > 1:
        scripts["migrate"] = PROJECT_DIR / "database.py"
    extra = {"gunicorn": "--workers"} if args.workers else {}
    if redis_url:
        extra["redis"] = "REDIS_URL"
    if args.ssl:
        extra["cryptography"] = "ssl_setup.py (--ssl)"
    backoff = restart_backoff(environ)
    for component in components:
        component.policy = RestartPolicy(base=backoff)
    return Plan(
        host=args.host,
        components=components,
        scripts=scripts,
        extra_modules=extra,
        database_url=api_env.get("DATABASE_URL") or None,
        db_path=api_env.get("DB_PATH") or "ratelimiter.db",
        redis_url=redis_url,
        cert_dir=cert_dir,
        notes=notes,
        migrate_first=args.workers > 1,
    )


# ---------------------------------------------------------------- supervision


def _die_with_parent_hook() -> Callable[[], None] | None:
    """Linux: a pre-exec hook so a child gets SIGTERM if run_system itself dies, even by SIGKILL.

    The libc function is resolved here, once, so the hook does no imports or lookups between
    fork and exec. Children are spawned from the main thread only (the signal follows the thread).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


DIE_WITH_PARENT = _die_with_parent_hook()


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Signal a whole process group (the child and its grandchildren); gone groups are fine."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class StopFlag:
    """A flag a signal handler may set: no lock, unlike threading.Event.

    The handler runs in the main thread between two bytecodes, possibly inside Event.wait with
    the Event's (non-reentrant) lock held; Event.set would then wait for that lock forever.
    """

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float) -> bool:
        """Sleep ``timeout`` seconds unless already set; True if set (then the caller stops)."""
        if not self._set:
            time.sleep(timeout)
        return self._set


class Supervisor:
    """Starts components, watches them, restarts them with backoff, and stops them all."""

    def __init__(self, components: Sequence[Component], host: str, start_timeout: float) -> None:
        self.components = list(components)
        self.host = host
        self.start_timeout = start_timeout
        self.stopping = StopFlag()
        self.forced = StopFlag()
        self.output_lock = threading.Lock()
        self.active: list[Component] = []

    def request_stop(self, signum: int, _frame: object = None) -> None:
        """Signal handler: the first signal stops gracefully, a second one skips the grace period."""
        if self.stopping.is_set():
            self.forced.set()
        else:
            log.info("received %s: stopping every component", signal.Signals(signum).name)
        self.stopping.set()

    # -- children

    def spawn(self, component: Component) -> None:
        component.output.clear()
        component.process = subprocess.Popen(
            component.argv,
            env=component.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: signals reach grandchildren too
            preexec_fn=DIE_WITH_PARENT,
        )
        component.reader = threading.Thread(
            target=self._relay, args=(component, component.process.stdout), name=f"relay-{component.name}", daemon=True
        )
        component.reader.start()
        if component not in self.active:
            self.active.append(component)

    def _relay(self, component: Component, stream: Iterable[bytes]) -> None:
        """Copy a child's output to ours, one prefixed line at a time, keeping the last lines."""
        for raw in stream:
            line = raw.decode("utf-8", errors="replace").rstrip()
            component.output.append(line)
            with self.output_lock:
                try:
                    sys.stdout.write(f"[{component.name}] {line}\n")
                    sys.stdout.flush()
                except (OSError, ValueError):
                    pass  # our stdout is gone; keep draining so the child never blocks on a full pipe

    def probe(self, component: Component, since: float) -> bool:
        """One health poll of a starting child: True when healthy; SetupError if it died or took too long."""
        process = component.process
        if process is None or process.poll() is not None:
            if component.reader:
                component.reader.join(timeout=1)  # let its last lines arrive for the message
            code = process.returncode if process else None
            raise SetupError(f"{component.name} exited with code {code} while starting{component.last_output()}")
        reason = component.health()
        if reason is None:
            return True
        if time.monotonic() - since > self.start_timeout:
            raise SetupError(
                f"{component.name} was not healthy within {self.start_timeout:.0f} s ({reason})"
                + component.last_output()
            )
        return False

    def wait_healthy(self, component: Component) -> bool:
        """Poll until healthy (True) or a stop is requested (False); SetupError on failure."""
        since = time.monotonic()
        while not self.stopping.is_set():
            if self.probe(component, since):
                return True
            self.stopping.wait(POLL_SECONDS)
        return False

    def start(self) -> bool:
        """Start each child once those it comes ``after`` are healthy; False if a stop came first."""
        names = {component.name for component in self.components}
        healthy: set[str] = set()
        spawned: dict[str, float] = {}
        while len(healthy) < len(self.components):
            for component in self.components:
                if component.name in healthy:
                    continue
                if component.name in spawned:
                    if self.probe(component, spawned[component.name]):
                        healthy.add(component.name)
                elif all(dep in healthy or dep not in names for dep in component.after):
                    self.spawn(component)
                    spawned[component.name] = time.monotonic()
            if self.stopping.wait(POLL_SECONDS):
                return False
        return True

    # -- watching

    def run(self) -> int:
        """Supervise until a stop is requested (0) or the API cannot be kept alive (1)."""
        while not self.stopping.wait(POLL_SECONDS):
            for component in list(self.active):
                if not self._watch(component):
                    return 1
        return 0

    def _watch(self, component: Component) -> bool:
        """Handle one component's death and due restart; False means give up on the whole system."""
        if component.restart_at is None:
            if component.alive():
                return True
            return self._schedule_restart(component)
        if time.monotonic() >= component.restart_at:
            component.restart_at = None
            self._restart(component)
        return True

    def _schedule_restart(self, component: Component) -> bool:
        assert component.process is not None
        code = component.process.returncode
        signal_group(component.process.pid, signal.SIGKILL)  # orphaned grandchildren would hold its ports
        delay = component.policy.next_delay()
        if delay is None:
            policy = component.policy
            log.error(
                "%s died %d times within %.0f s; giving up on it%s",
                component.name,
                policy.limit + 1,
                policy.window,
                component.last_output(),
            )
            self.active.remove(component)
            if component.essential:
                log.error("the %s cannot be kept running: stopping everything", component.name)
                return False
            log.error("continuing without %s", component.name)
            return True
        log.warning("%s exited with code %s; restarting it in %.0f s", component.name, code, delay)
        component.restart_at = time.monotonic() + delay
        return True

    def _restart(self, component: Component) -> None:
        component.policy.record()
        self._wait_ports_free(component)
        self.spawn(component)
        try:
            if self.wait_healthy(component):
                restarts = len(component.policy.history)
                log.info(
                    "%s restarted (pid %d, restart %d of %d allowed in %.0f s)",
                    component.name,
                    component.pid,
                    restarts,
                    component.policy.limit,
                    component.policy.window,
                )
        except SetupError as exc:
            log.error("restart failed: %s", exc)

    def _wait_ports_free(self, component: Component, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stopping.is_set():
            busy = [port for port in component.ports if port_problem(self.host, port, "", "")]
            if not busy:
                return
            self.stopping.wait(POLL_SECONDS)

    # -- stopping

    def shutdown(self, grace: float = GRACE_SECONDS) -> None:
        """TERM every running process group (reverse start order), KILL what is left after ``grace`` seconds.

        Children that died earlier had their group killed then; their ids may since belong to others.
        """
        running = [(c, c.process) for c in reversed(self.components) if c.process is not None and c.alive()]
        for _component, process in running:
            signal_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(c.alive() for c, _process in running) and time.monotonic() < deadline and not self.forced.is_set():
            time.sleep(POLL_SECONDS / 2)
        for component, process in running:
            if component.alive():
                log.warning("%s did not stop within %.0f s: killing it", component.name, grace)
            signal_group(process.pid, signal.SIGKILL)  # also catches lingering grandchildren
            process.wait()
        for component in self.components:
            if component.reader:
                component.reader.join(timeout=2)


# ---------------------------------------------------------------- entry point


def port_list(raw: str) -> list[int]:
    try:
        ports = [int(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of port numbers, got {raw!r}") from None
    if not ports or any(not 0 < port < 65536 for port in ports):
        raise argparse.ArgumentTypeError(f"ports must be in 1..65535, got {raw!r}")
    return ports


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_system.py",
        description="Check dependencies, then start and supervise the mock backends, the load balancer and the API.",
        epilog="Example: python run_system.py --dev --skip-db   (Ctrl-C stops everything)",
    )
    parser.add_argument(
        "--dev", action="store_true", help="FLASK_ENV=development and a generated ADMIN_TOKEN (printed) if unset"
    )
    parser.add_argument("--skip-db", action="store_true", help="do not check the database before starting")
    parser.add_argument("--no-lb", action="store_true", help="do not start the load balancer")
    parser.add_argument(
        "--gateway", action="store_true", help="gateway mode: the balancer asks the API's /forward_auth first"
    )
    parser.add_argument("--no-backends", action="store_true", help="do not start the mock backends")
    parser.add_argument("--ssl", action="store_true", help="serve the API over HTTPS with a dev certificate")
    parser.add_argument(
        "--cert-dir", metavar="DIR", default="certs", help="where --ssl keeps cert.pem, key.pem [certs]"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address every component binds [127.0.0.1]")
    parser.add_argument("--api-port", metavar="PORT", type=int, default=5000, help="API port [5000]")
    parser.add_argument("--lb-port", metavar="PORT", type=int, default=8080, help="load balancer port [8080]")
    parser.add_argument(
        "--backend-ports", metavar="P,P,P", type=port_list, default=[5001, 5002, 5003], help="[5001,5002,5003]"
    )
    parser.add_argument(
        "--workers", metavar="N", type=int, default=0, help="run the API under gunicorn with N workers (N>1: Redis)"
    )
    parser.add_argument("--redis", metavar="URL", help="shared limiter store (default: REDIS_URL)")
    parser.add_argument("--database-url", metavar="URL", help="SQLAlchemy URL (default: DATABASE_URL, else SQLite)")
    parser.add_argument(
        "--start-timeout", metavar="S", type=float, default=30.0, help="seconds each component may take [30]"
    )
    return parser


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return f"[run_system] {level}{record.getMessage()}"


def configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def print_table(components: Sequence[Component]) -> None:
    rows = [(c.name, str(c.pid), ", ".join(c.urls)) for c in components if c.process is not None]
    width = max(len(name) for name, _, _ in rows)
    print(f"\n  {'COMPONENT':<{max(width, 9)}}  {'PID':<8} URL")
    for name, pid, urls in rows:
        print(f"  {name:<{max(width, 9)}}  {pid:<8} {urls}")
    print("System ready. Press Ctrl-C to stop everything.\n", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    if args.workers < 0:
        log.error("--workers must be 0 (run app.py) or more, got %d", args.workers)
        return 2
    try:
        plan = build_plan(args, dict(os.environ))
    except SetupError as exc:
        log.error("%s", exc)
        return 1
    problems = check_plan(plan, args.skip_db)
    for problem in problems:
        log.error("%s", problem)
    if problems:
        return 1
    if plan.cert_dir is not None:
        import ssl_setup  # only now: the import check above vouched for cryptography

        try:
            pair = ssl_setup.ensure_dev_cert(plan.cert_dir)
        except ssl_setup.CertError as exc:
            log.error("cannot prepare the TLS certificate: %s", exc)
            return 1
        log.info(
            "TLS: %s certificate %s (trust it with e.g. curl --cacert)", "new" if pair.created else "using", pair.cert
        )
    for note in plan.notes:
        log.info("%s", note)
    return supervise(plan, args.start_timeout)


def migrate_once(env: dict[str, str], timeout: float) -> None:
    """Apply schema migrations in one process, before several workers boot and race to do it."""
    argv = [sys.executable, str(PROJECT_DIR / "database.py"), "migrate"]
    try:
        result = subprocess.run(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise SetupError(f"database migration did not finish within {timeout:.0f} s") from None
    lines = result.stdout.decode("utf-8", errors="replace").strip().splitlines()
    for line in lines:
        print(f"[migrate] {line}", flush=True)
    if result.returncode != 0:
        raise SetupError(f"database migration failed (exit {result.returncode}); last output: {' | '.join(lines[-8:])}")


def supervise(plan: Plan, start_timeout: float) -> int:
    """Start everything, print the table, supervise until a signal; always stop every child."""
    supervisor = Supervisor(plan.components, plan.host, start_timeout)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, supervisor.request_stop)
    began = time.monotonic()
    try:
        try:
            if plan.migrate_first:
                migrate_once(next(c for c in plan.components if c.name == "api").env, start_timeout)
            if not supervisor.start():
                return 0
        except SetupError as exc:
            log.error("%s", exc)
            return 1
        log.info("all components healthy in %.1f s", time.monotonic() - began)
        print_table(plan.components)
        return supervisor.run()
    finally:
        supervisor.shutdown()
        log.info("stopped")


if __name__ == "__main__":
    sys.exit(main())
