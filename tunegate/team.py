"""The team setup on one machine, without Docker: the same services as infra/compose, on 127.0.0.1.

    tunegate team up                 # starts everything under .team/, prints what to export, stays in the foreground
    source .team/client.env          # in another shell: the URLs and this setup's credentials for tunegate and Prefect

- PostgreSQL (the OS package's server binaries): databases `mlflow`, `mlflow_auth` and `prefect`;
- `mlflow server`: PostgreSQL backend, basic auth, artifacts proxied (`--serve-artifacts`) to a folder on
  disk, `<home>/artifacts`, so every registered model outlives a restart of the stack; or to the S3 bucket
  `TUNEGATE_ARTIFACTS_DESTINATION` names (`s3://bucket/prefix`, with `AWS_*` and `MLFLOW_S3_ENDPOINT_URL`
  in the environment, e.g. MinIO as infra/compose runs it). Clients never hold storage credentials;
  the proxy checks MLflow's own users first. (No S3 server here by default: the one installable from PyPI,
  moto, keeps objects in memory and lost every model on restart; a folder served by MLflow is the store
  that needs no second server to keep alive.)
- `prefect server` on PostgreSQL, with basic auth;
- a Prefect worker of a process work pool, which runs the pipeline's deployments (`tunegate deploy --pool`).

Credentials are made once (random) into `<home>/secrets.env` (mode 600) unless the environment already
sets them (`TEAM_VARS`, the names infra/compose/.env.example uses); they reach the servers through
their environment or a mode-600 config file, never a command line, and clients read them from
`client.env`. Every service logs to `<home>/logs/<service>.log`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunegate.errors import UserError
from tunegate.runtime import free_port

SERVICES = ("postgres", "mlflow", "prefect", "worker")
ARTIFACTS = "artifacts"  # <home>/artifacts: the model files MLflow serves
DESTINATION_VAR = "TUNEGATE_ARTIFACTS_DESTINATION"  # an S3 bucket instead of the folder
POOL = "tunegate"
DB_USER = "tunegate"
DATABASES = ("mlflow", "mlflow_auth", "prefect")
# What a team sets (infra/compose/.env.example has the same names); generated here when unset.
TEAM_VARS = (
    "POSTGRES_PASSWORD",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
    "PREFECT_API_AUTH_STRING",
)
SECRET_VARS = {"POSTGRES_PASSWORD", "MLFLOW_TRACKING_PASSWORD"}
SECRET_VARS |= {"MLFLOW_FLASK_SERVER_SECRET_KEY", "PREFECT_API_AUTH_STRING"}


def pg_bin() -> Path:
    """The folder of PostgreSQL's server binaries: $TUNEGATE_PG_BIN, `postgres` on PATH, or Debian's layout."""
    for folder in filter(None, [os.environ.get("TUNEGATE_PG_BIN")]):
        if (Path(folder) / "postgres").exists():
            return Path(folder)
    found = shutil.which("postgres")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3]))
    if versions:
        return versions[-1].parent
    raise UserError(
        "PostgreSQL server binaries not found: install the OS package (apt-get install postgresql) "
        "or set TUNEGATE_PG_BIN to the folder holding `postgres` and `initdb`"
    )


def _credentials(home: Path) -> dict[str, str]:
    """This setup's credentials: the environment's where set, else those made the first time (secrets.env)."""
    path = home / "secrets.env"
    saved = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line) if path.exists() else {}
    made = {
        "POSTGRES_PASSWORD": secrets.token_urlsafe(18),
        "MLFLOW_TRACKING_USERNAME": "tunegate",
        "MLFLOW_TRACKING_PASSWORD": secrets.token_urlsafe(18),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(24),
        "PREFECT_API_AUTH_STRING": f"tunegate:{secrets.token_urlsafe(18)}",
    }
    creds = {key: os.environ.get(key) or saved.get(key) or made[key] for key in TEAM_VARS}
    _write_private(path, "".join(f"{k}={v}\n" for k, v in creds.items()))
    return creds


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (mode 600 from the start, then renamed into place)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@dataclass
class TeamStack:
    """PostgreSQL, MLflow (artifacts in `home`/artifacts), Prefect server and a process worker under `home`,
    on free 127.0.0.1 ports.

    `start()` brings up what is not running, in dependency order, and waits for each health check;
    `stop(name, hard=True)` kills one service the way a crash would (SIGKILL; PostgreSQL's immediate
    shutdown) so tests can cut a server mid-operation and `start()` it again with its data intact.
    """

    home: Path
    pool: str = POOL
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.home = Path(self.home).resolve()
        (self.home / "logs").mkdir(parents=True, exist_ok=True)
        self.creds = _credentials(self.home)
        saved = self.home / "ports"
        known = dict(line.split("=") for line in saved.read_text().split()) if saved.exists() else {}
        for name in ("postgres", "mlflow", "prefect"):
            self.ports.setdefault(name, int(known.get(name, 0)) or free_port())
        saved.write_text("".join(f"{k}={v}\n" for k, v in self.ports.items()))

    # -- what clients use ---------------------------------------------------------------------------
    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    @property
    def prefect_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['prefect']}/api"

    @property
    def artifacts(self) -> str:
        """Where MLflow keeps the model files: the S3 URI of TUNEGATE_ARTIFACTS_DESTINATION, else <home>/artifacts."""
        return os.environ.get(DESTINATION_VAR) or str(self.home / ARTIFACTS)

    def client_env(self) -> dict[str, str]:
        """What a teammate's shell needs: no storage credentials (MLflow proxies the artifacts), no database."""
        return {
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "MLFLOW_TRACKING_USERNAME": self.creds["MLFLOW_TRACKING_USERNAME"],
            "MLFLOW_TRACKING_PASSWORD": self.creds["MLFLOW_TRACKING_PASSWORD"],
            "PREFECT_API_URL": self.prefect_url,
            "PREFECT_API_AUTH_STRING": self.creds["PREFECT_API_AUTH_STRING"],
        }

    def write_client_env(self) -> Path:
        path = self.home / "client.env"
        _write_private(path, "".join(f"export {k}={v}\n" for k, v in self.client_env().items()))
        return path

    @property
    def prefect_auth(self) -> tuple[str, str]:
        """(user, password) of Prefect's basic auth."""
        user, password = self.creds["PREFECT_API_AUTH_STRING"].split(":", 1)
        return user, password

    def _db_url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{DB_USER}:{self.creds['POSTGRES_PASSWORD']}@127.0.0.1:{self.ports['postgres']}/{database}"

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self, *names: str, timeout: float = 180) -> TeamStack:
        for name in names or SERVICES:
            if name in self.procs and self.procs[name].poll() is None:
                continue
            getattr(self, f"_start_{name}")(timeout)
        self.write_client_env()
        return self

    def stop(self, *names: str, hard: bool = False) -> None:
        """Stop services (all, in reverse order, by default). hard: as a crash would."""
        for name in names or tuple(reversed(SERVICES)):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            if name == "postgres":  # SIGQUIT: immediate shutdown (crash recovery at next start); SIGINT: fast
                proc.send_signal(signal.SIGQUIT if hard else signal.SIGINT)
            elif hard:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                os.killpg(proc.pid, signal.SIGTERM)
            try:  # PostgreSQL writes a checkpoint on the way down; the others get 10 s to finish their requests
                proc.wait(timeout=30 if name == "postgres" else 10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
            if name != "postgres":  # the server's own children (uvicorn workers) go with it
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)

    def __enter__(self) -> TeamStack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
        log = open(self.home / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it open
        base = {k: v for k, v in os.environ.items() if k not in TEAM_VARS and not k.startswith(("MLFLOW_", "PREFECT_"))}
        proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**base, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", **(env or {})},
            start_new_session=True,  # its own process group: stop() ends the server and its workers
            **kw,
        )
        log.close()
        self.procs[name] = proc
        return proc

    def _wait(self, name: str, ready, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.procs[name].poll() is not None:
                tail = (self.home / "logs" / f"{name}.log").read_text(errors="replace").strip().splitlines()[-3:]
                raise UserError(f"team: {name} exited at start ({' / '.join(tail)[:400]}); log: logs/{name}.log")
            with contextlib.suppress(Exception):
                if ready():
                    return
            time.sleep(0.3)
        raise UserError(f"team: {name} not ready within {timeout:.0f}s; see {self.home / 'logs' / f'{name}.log'}")

    # -- PostgreSQL ----------------------------------------------------------------------------------
    def _start_postgres(self, timeout: float) -> None:
        folder, as_user, bin_dir = _pg_dir(self.home), _pg_user(), pg_bin()
        data = folder / "data"
        if as_user:
            os.chown(folder, as_user["user"], as_user["group"])
            folder.chmod(0o700)
        if not (data / "PG_VERSION").exists():
            shutil.rmtree(data, ignore_errors=True)
            pwfile = folder / "initpw"
            _write_private(pwfile, self.creds["POSTGRES_PASSWORD"] + "\n")
            if as_user:
                os.chown(pwfile, as_user["user"], as_user["group"])
            try:
                init = subprocess.run(
                    [str(bin_dir / "initdb"), "-D", str(data), "-U", DB_USER, f"--pwfile={pwfile}"]
                    + ["--auth=scram-sha-256", "--encoding=UTF8", "--no-instructions"],
                    capture_output=True,
                    text=True,
                    **as_user,
                )
            finally:
                pwfile.unlink(missing_ok=True)
            if init.returncode:
                raise UserError(f"team: initdb failed: {(init.stderr or init.stdout).strip().splitlines()[-1]}")
        self._spawn(
            "postgres",
            [str(bin_dir / "postgres"), "-D", str(data), "-p", str(self.ports["postgres"])]
            + ["-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=", "-c", "fsync=on"],
            **as_user,
        )
        self._wait("postgres", lambda: self._sql("postgres", "select 1") is not None, timeout)
        for db in DATABASES:
            if not self._sql("postgres", f"select 1 from pg_database where datname = '{db}'"):
                self._sql("postgres", f'create database "{db}"')

    def _sql(self, database: str, query: str):
        import psycopg2

        conn = psycopg2.connect(self._db_url(database), connect_timeout=3)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(query)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    # -- MLflow --------------------------------------------------------------------------------------
    def _start_mlflow(self, timeout: float) -> None:
        auth = self.home / "mlflow-auth.ini"
        _write_private(
            auth,
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = {self._db_url('mlflow_auth')}\n"
            f"admin_username = {self.creds['MLFLOW_TRACKING_USERNAME']}\n"
            f"admin_password = {self.creds['MLFLOW_TRACKING_PASSWORD']}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
        )
        env = {
            "MLFLOW_BACKEND_STORE_URI": self._db_url("mlflow"),
            "MLFLOW_AUTH_CONFIG_PATH": str(auth),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": self.creds["MLFLOW_FLASK_SERVER_SECRET_KEY"],
            # MLflow's job runner (GenAI evaluation jobs: six huey processes) is nothing tunegate uses
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        exe = Path(sys.executable).parent / "mlflow"
        if not os.environ.get(DESTINATION_VAR):
            (self.home / ARTIFACTS).mkdir(exist_ok=True)
        elif os.environ.get("MLFLOW_S3_ENDPOINT_URL"):  # MinIO or another S3-compatible server
            env["MLFLOW_S3_ENDPOINT_URL"] = os.environ["MLFLOW_S3_ENDPOINT_URL"]
        self._spawn(
            "mlflow",
            [str(exe), "server", "--host", "127.0.0.1", "--port", str(self.ports["mlflow"]), "--workers", "1"]
            + ["--app-name", "basic-auth", "--serve-artifacts", "--artifacts-destination", self.artifacts],
            env=env,
        )
        import requests

        self._wait("mlflow", lambda: requests.get(f"{self.mlflow_url}/health", timeout=3).ok, timeout)

    # -- Prefect -------------------------------------------------------------------------------------
    def _prefect_env(self) -> dict[str, str]:
        return {
            "PREFECT_HOME": str(self.home / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_URL": self.prefect_url,
            "PREFECT_API_AUTH_STRING": self.creds["PREFECT_API_AUTH_STRING"],
        }

    def _start_prefect(self, timeout: float) -> None:
        env = {
            **self._prefect_env(),
            "PREFECT_API_DATABASE_CONNECTION_URL": self._db_url("prefect", "postgresql+asyncpg"),
            "PREFECT_SERVER_API_AUTH_STRING": self.creds["PREFECT_API_AUTH_STRING"],
            "PREFECT_UI_API_URL": self.prefect_url,
        }
        exe = Path(sys.executable).parent / "prefect"
        port = str(self.ports["prefect"])
        self._spawn("prefect", [str(exe), "server", "start", "--host", "127.0.0.1", "--port", port], env=env)
        import requests

        self._wait(
            "prefect", lambda: requests.get(f"{self.prefect_url}/health", auth=self.prefect_auth, timeout=3).ok, timeout
        )

    def _start_worker(self, timeout: float) -> None:
        exe = Path(sys.executable).parent / "prefect"
        env = {**self._prefect_env(), **self.client_env(), "PREFECT_WORKER_QUERY_SECONDS": "2"}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        made = subprocess.run(
            [str(exe), "work-pool", "create", self.pool, "--type", "process", "--overwrite"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
        )
        if made.returncode:
            raise UserError(f"team: work pool {self.pool}: {(made.stderr or made.stdout).strip()[-300:]}")
        self._spawn("worker", [str(exe), "worker", "start", "--pool", self.pool, "--type", "process"], env=env)
        self._wait("worker", lambda: self.worker_online(), timeout)

    def prefect_api(self, method: str, path: str, **kw):
        import requests

        url = f"{self.prefect_url}/{path.lstrip('/')}"
        response = requests.request(method, url, auth=self.prefect_auth, timeout=10, **kw)
        response.raise_for_status()
        return response.json()

    def worker_online(self) -> bool:
        workers = self.prefect_api("POST", f"work_pools/{self.pool}/workers/filter", json={})
        return any(w.get("status") == "ONLINE" for w in workers)


def _pg_dir(home: Path) -> Path:
    """PostgreSQL's data folder under home. As root, PostgreSQL runs as the `postgres` user, which must be able
    to reach it (else the folder is a link to one it can)."""
    folder = home / "postgres"
    if os.geteuid() == 0 and not _reachable_by("postgres", home):
        link = folder
        if not link.is_symlink():
            import tempfile

            target = Path(tempfile.mkdtemp(prefix="tunegate-postgres-"))
            link.symlink_to(target)
        folder = link.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _pg_user() -> dict:
    """The subprocess arguments that run PostgreSQL as `postgres` when this is root (it refuses root)."""
    if os.geteuid() != 0:
        return {}
    import pwd

    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        raise UserError("team: PostgreSQL does not run as root and there is no `postgres` user") from None
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def missing_files(stack: TeamStack, sample: int = 3) -> tuple[int, list[str]]:
    """(versions checked, `name vN` of those whose files the artifact store no longer holds): the latest
    `sample` versions of every registered model, listed through the server as a client would."""
    import mlflow
    from mlflow import MlflowClient

    checked, gone = 0, []
    # MLflow resolves `models:/<id>` and `mlflow-artifacts:` through its process-wide tracking URI: this
    # server's for the duration, whatever a caller had set
    was = mlflow.get_tracking_uri()
    with _environment(stack.client_env()), contextlib.ExitStack() as restore:
        mlflow.set_tracking_uri(stack.mlflow_url)
        restore.callback(mlflow.set_tracking_uri, was)
        c = MlflowClient(tracking_uri=stack.mlflow_url, registry_uri=stack.mlflow_url)
        for model in c.search_registered_models(max_results=1000):
            for v in c.search_model_versions(
                f"name = '{model.name}'", max_results=sample, order_by=["version_number DESC"]
            ):
                checked += 1
                try:
                    listed = mlflow.artifacts.list_artifacts(artifact_uri=v.source, tracking_uri=stack.mlflow_url)
                except Exception:  # noqa: BLE001 - whatever the store says: the files cannot be had
                    listed = []
                if not listed:
                    gone.append(f"{model.name} v{v.version}")
    return checked, gone


def store_line(stack: TeamStack) -> str:
    """One line on whether the artifact store still holds what the registry lists (checked at start)."""
    try:
        checked, gone = missing_files(stack)
    except Exception as err:  # noqa: BLE001 - a check that cannot run is said, never fatal
        return f"team: registry check skipped ({type(err).__name__})"
    if gone:
        return (
            f"team: WARNING: the artifact store ({stack.artifacts}) no longer holds the files of "
            f"{', '.join(gone)}: the registry lists them, but fetch and promote will refuse them"
        )
    return f"team: artifact store {stack.artifacts}: files present for the {checked} latest version(s) sampled"


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """os.environ with `values` set for the duration (MLflow's client reads its credentials from there)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _reachable_by(user: str, folder: Path) -> bool:
    """Whether `user` can enter every folder on the way to `folder` (checked through the permission bits)."""
    import pwd

    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return False
    for part in [folder, *folder.parents]:
        st = part.stat()
        if st.st_uid == entry.pw_uid:
            ok = st.st_mode & 0o100
        elif st.st_gid == entry.pw_gid:
            ok = st.st_mode & 0o010
        else:
            ok = st.st_mode & 0o001
        if not ok:
            return False
    return True


def up(home: Path) -> None:
    """`tunegate team up`: start everything, print what to export, run until Ctrl-C (or SIGTERM), then stop
    it all; a service that stops by itself ends it too, with the service named."""

    def interrupted(*_):
        raise KeyboardInterrupt

    # Ctrl-C, and a service manager's SIGTERM, stop everything (a shell's `&` would leave SIGINT ignored)
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    stack = TeamStack(home)
    print(f"team: starting PostgreSQL, MLflow, Prefect and a worker under {stack.home} ...")
    with stack:
        env = stack.write_client_env()
        print(
            f"  MLflow   {stack.mlflow_url}  (PostgreSQL backend, artifacts proxied to {stack.artifacts})\n"
            f"  Prefect  {stack.prefect_url.removesuffix('/api')}  (work pool {stack.pool}: a process worker)\n"
            f"{store_line(stack)}\n"
            f"credentials: {stack.home / 'secrets.env'}; logs: {stack.home / 'logs'}\n"
            f"in another shell:  source {env}\n"
            f"then in params.yaml register.tracking_uri: {stack.mlflow_url}\n"
            f"and `tunegate deploy --pool {stack.pool}` from the project\n"
            "Ctrl-C stops everything (the registry, runs and model files stay on disk for the next `tunegate team up`)."
        )
        with contextlib.suppress(KeyboardInterrupt):
            while all(p.poll() is None for p in stack.procs.values()):
                time.sleep(1)
            gone = [n for n, p in stack.procs.items() if p.poll() is not None]
            raise UserError(f"team: {', '.join(gone)} stopped; see {stack.home / 'logs'}")
