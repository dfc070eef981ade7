"""The warm runner: stages started by `dvc repro` skip the 5-15 s their libraries take to import.

Every stage is its own `python -m stages.X` process (DVC runs each command afresh), and most of a small run's
time goes to importing torch, transformers, peft, TRL, lm-eval, Great Expectations and MLflow again in each
one. `tunegate warm` imports them once and waits on a Unix socket; with `TUNEGATE_WARM` naming that socket, a
stage's process hands its command to the runner, which forks a copy of itself to run it and reports the exit
status back. The stage runs in the caller's folder, environment, umask, stdin/stdout/stderr and arguments, as
the process it replaces would; signals sent to that process (Ctrl-C, SIGTERM) reach the stage, and if the
process is killed outright the stage is killed with it.

The stage runs where it would have run cold, with these differences, which decide when the runner declines:
- Libraries read some environment variables once, when imported (HF_*, OMP_NUM_THREADS, ...): a process
  whose values differ from the runner's (IMPORT_TIME) runs cold, as does one from another Python or with
  interpreter options (`python -X ... -m`).
- Processes a stage starts itself (accelerate's workers) run cold: the runner's variable is not passed on.
- The runner forks only while it has one Python thread; if an import left one running, it declines every stage.
Declining is never an error: the stage runs in its own process, as without the runner. The runner prints a line
per stage: forked (and, when it ends, its exit status, wall and CPU seconds), or declined and why.

    tunegate warm &                                    # or: python -m tunegate.warm SOCKET
    export TUNEGATE_WARM=$PWD/.tunegate-warm.sock
    dvc repro
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator

ENV = "TUNEGATE_WARM"
DEFAULT_SOCKET = ".tunegate-warm.sock"
# What the stages import, entry points only (each pulls in the rest): measured as the union of every stage's
# sys.modules on the demo pipeline. A module missing here is imported by the stage itself, as without the runner.
PRELOAD = (
    "numpy",
    "pandas",
    "pyarrow",
    "pyarrow.parquet",
    "yaml",
    "torch",
    "transformers",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "transformers.models.llama.modeling_llama",
    "transformers.models.qwen2.modeling_qwen2",
    "transformers.trainer",
    "tokenizers",
    "datasets",
    "accelerate",
    "peft",
    "bitsandbytes",
    "trl",
    "trl.trainer.sft_trainer",
    "trl.trainer.dpo_trainer",
    "lm_eval",
    "lm_eval.evaluator",
    "lm_eval.tasks",
    "lm_eval.models.huggingface",
    "great_expectations",
    "mlflow",
    "mlflow.tracking",
    "sqlalchemy",
    "scipy.stats",
    "safetensors.torch",
    "bm25s",
    "matplotlib.pyplot",
)
# Environment variables some library reads once, at import: the runner imported them under its own values, so a
# stage whose values differ runs cold. (Variables read when used, such as MLFLOW_TRACKING_URI, may differ.)
IMPORT_TIME = (
    "HF_",
    "HUGGINGFACE",
    "TRANSFORMERS_",
    "TOKENIZERS_",
    "DATASETS_",
    "TORCH",
    "PYTORCH_",
    "CUDA_",
    "NVIDIA_",
    "OMP_",
    "MKL_",
    "OPENBLAS_",
    "KMP_",
    "GOMP_",
    "BNB_",
    "ACCELERATE_",
    "TRL_",
    "PEFT_",
    "GX_",
    "LM_EVAL",
    "USE_TORCH",
    "USE_TF",
    "USE_FLAX",
    "LD_",
    "MALLOC_",
    "PYTHON",
    "LANG",
    "LC_",
    "TZ",
    "XDG_",
    "HOME",
    "TMPDIR",
    "TUNEGATE_VERBOSE",
)
OWN_PACKAGES = ("tunegate", "stages", "flows", "demo", "benchmarks", "tests")
REQUEST_TIMEOUT = 10.0
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def import_env(env: dict[str, str]) -> dict[str, str]:
    """The variables of `env` that libraries read at import, after the defaults a stage's set-up adds."""
    from tunegate import runtime

    effective = {**env, **runtime.env_defaults(env)}
    return {k: v for k, v in sorted(effective.items()) if k.startswith(IMPORT_TIME) and k != "PYTHONPATH"}


# ---------------------------------------------------------------------------------------------- the caller


def hand_off() -> None:
    """Called from `stages/__init__.py` while `python -m stages.X` locates its module: run the stage in the warm
    runner named by $TUNEGATE_WARM and exit with its status. Returns (and the stage runs here, cold) when there is
    no runner or it declines."""
    path = os.environ.get(ENV, "")
    argv = getattr(sys, "orig_argv", [])
    if not path or len(argv) < 3 or argv[1] != "-m" or sys.argv[:1] != ["-m"]:
        return
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(REQUEST_TIMEOUT)
        conn.connect(path)
    except OSError:
        return  # no runner (yet): cold
    with conn:
        umask = os.umask(0)
        os.umask(umask)
        request = {
            "module": argv[2],
            "args": sys.argv[1:],
            "cwd": os.getcwd(),
            "env": dict(os.environ),
            "umask": umask,
            "executable": sys.executable,
        }
        try:
            socket.send_fds(conn, [b"R"], [0, 1, 2])
            conn.sendall(json.dumps(request).encode() + b"\n")
            # No time limit from here: giving up while the runner forks would leave the stage running twice.
            # A runner that dies answers with the end of the stream, and the stage runs here.
            conn.settimeout(None)
            reader = conn.makefile("rb")
            first = json.loads(reader.readline() or b"{}")
        except (OSError, ValueError):
            return
        if "pid" not in first:
            return  # declined (first["cold"] says why): cold
        _wait_and_exit(first["pid"], reader)


def _wait_and_exit(pid: int, reader) -> None:
    """Forward signals to the stage until the runner reports how it ended; end this process the same way."""

    def forward(signum, _frame):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for signum in FORWARDED:
        signal.signal(signum, forward)
    while True:
        try:
            line = reader.readline()
            break
        except InterruptedError:
            continue
    status = json.loads(line or b'{"lost": true}')
    sys.stdout.flush()
    if "signal" in status:
        signum = status["signal"]
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)
    if "exit" not in status:
        os.write(2, b"tunegate: the warm runner stopped before the stage ended\n")
        os._exit(1)
    os._exit(status["exit"])


# ---------------------------------------------------------------------------------------------- the runner


def threads() -> int:
    """Python threads of this process. A fork copies only the calling thread, so a lock another Python thread held
    stays held in the copy. The native pools libraries start at import (OpenBLAS, jemalloc) reset themselves on
    fork, and OpenMP's is only a risk once a parallel region ran, which importing does not do."""
    return threading.active_count()


def preload(modules: Iterable[str] = PRELOAD) -> list[str]:
    """Import what the stages import; returns the modules that failed (an optional extra not installed)."""
    from tunegate import runtime

    runtime.configure_env()
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - any import failure only means the stage imports it itself
            missing.append(name)
    return missing


class Runner:
    """Listens on `path`; each request is forked off to a supervisor, which forks the stage and reports how it ended."""

    def __init__(self, path: str, quiet: bool = False):
        self.path, self.quiet = os.path.abspath(path), quiet
        self.set_by_imports: dict[str, str] = {}
        self.env: dict[str, str] = {}  # import_env as the imports left it: set by preload
        self.base_path = _base_sys_path()
        self.sock: socket.socket | None = None

    def preload(self, modules: Iterable[str]) -> list[str]:
        """Import `modules` (preload), noting the variables the imports themselves set (torch's
        TORCHINDUCTOR_CACHE_DIR, the stage defaults): a caller without them is one whose imports would set them."""
        before = dict(os.environ)
        missing = preload(modules)
        self.set_by_imports = {k: v for k, v in os.environ.items() if before.get(k) != v}
        self.env = import_env(dict(os.environ))
        return missing

    def bind(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with probe:
                try:
                    probe.connect(self.path)
                except ConnectionRefusedError:
                    os.unlink(self.path)  # left by a runner that was killed
                else:
                    raise SystemExit(f"tunegate warm: a runner already listens on {self.path}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)  # the socket is the user's alone: requests carry their environment
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        sock.listen(64)
        self.sock = sock

    def serve_forever(self) -> None:
        """Accept until SIGTERM/SIGINT. In a forked stage this returns nothing: the stage's process exits."""
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped by the kernel
        assert self.sock is not None
        while True:
            try:
                conn, _ = self.sock.accept()
            except InterruptedError:
                continue
            request = self._read(conn)
            if request is None:
                conn.close()
                continue
            request["env"] = {**self.set_by_imports, **request["env"]}  # as the stage's own imports would leave it
            reason = self._decline(request)
            self._say(request, reason)
            if reason:
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps({"cold": reason}).encode() + b"\n")
                _close_all(conn, request["fds"])
                continue
            if os.fork() == 0:  # the supervisor
                self.sock.close()
                # never returns in the supervisor; returns in the stage
                _supervise(conn, request, self.base_path, self.quiet)
                return
            _close_all(conn, request["fds"])

    def _say(self, request: dict, reason: str | None) -> None:
        """One line per stage handed over: forked, or declined and why (names of variables, never their values)."""
        if not self.quiet:
            _log(request, f"declined ({reason}): it runs cold" if reason else "forked")

    def _read(self, conn: socket.socket) -> dict | None:
        conn.settimeout(REQUEST_TIMEOUT)
        fds: list[int] = []
        try:
            _, fds, _, _ = socket.recv_fds(conn, 1, 3)
            data = b""
            while not data.endswith(b"\n"):
                chunk = conn.recv(1 << 16)
                if not chunk:
                    raise ConnectionError("closed")
                data += chunk
            request = json.loads(data)
        except (OSError, ValueError):
            _close_all(None, fds)
            return None
        if len(fds) != 3:
            _close_all(None, fds)
            return None
        conn.settimeout(None)
        request["fds"] = fds
        return request

    def _decline(self, request: dict) -> str | None:
        if request.get("executable") != sys.executable:
            return f"another Python ({request.get('executable')})"
        if not str(request.get("module", "")).startswith("stages."):
            return "not a stage"
        theirs = import_env(request["env"])
        if theirs != self.env:
            changed = sorted(k for k in theirs.keys() | self.env.keys() if theirs.get(k) != self.env.get(k))
            return "environment differs: " + ", ".join(changed)
        if threads() > 1:
            return f"the runner has {threads()} threads; a fork would copy one"
        return None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def _log(request: dict, what: str) -> None:
    """A line of the runner's log about one stage."""
    print(f"{time.strftime('%H:%M:%S')} {request.get('module')} in {request.get('cwd')}: {what}", flush=True)


def _close_all(conn: socket.socket | None, fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    if conn is not None:
        conn.close()


def _base_sys_path() -> list[str]:
    """sys.path without what the interpreter put first for this process (its script's folder, or the current one
    for `-m`) and its PYTHONPATH: the part every `python -m` of this interpreter shares."""
    own = {os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    return [p for p in sys.path[1:] if os.path.abspath(p or ".") not in own]


def _supervise(conn: socket.socket, request: dict, base_path: list[str], quiet: bool) -> None:
    """Fork the stage, report its end to the caller (and, unless quiet, its exit status, wall and CPU seconds to the
    runner's log), and exit."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        conn.close()
        _become_stage(request, base_path)
        return  # back to the runner's frames, which return at once: runpy runs the stage from there
    _close_all(None, request["fds"])
    code = 1
    try:
        try:
            conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            heard = True
        except OSError:  # the caller is gone before it heard of the stage: it must not run
            os.kill(pid, signal.SIGKILL)
            heard = False
        if heard:
            pidfd = os.pidfd_open(pid)
            ready, _, _ = select.select([conn, pidfd], [], [])  # the caller sends nothing: readable means it is gone
            if pidfd not in ready and not _alive(conn):  # the caller was killed: so is its stage
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        _, status, usage = os.wait4(pid, 0)
        if os.WIFSIGNALED(status):
            report = {"signal": os.WTERMSIG(status)}
        else:
            report = {"exit": os.waitstatus_to_exitcode(status)}
        if not quiet:  # logged before the caller hears: once it goes on, the runner's log says how the stage ended
            ended = f"exit {report['exit']}" if "exit" in report else f"signal {report['signal']}"
            cpu = usage.ru_utime + usage.ru_stime
            _log(request, f"{ended} after {time.monotonic() - started:.1f} s, {cpu:.1f} s CPU")
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps(report).encode() + b"\n")
        code = 0 if heard else 1
    finally:
        os._exit(code)


def _alive(conn: socket.socket) -> bool:
    """Whether the caller still holds its end (it never writes after its request: readable means closed)."""
    try:
        return bool(conn.recv(1))
    except OSError:
        return False


STAGE: dict = {}  # set in the forked stage: what `main()` runs after the runner's frames have returned


def _become_stage(request: dict, base_path: list[str]) -> None:
    """Turn this forked copy into the caller's `python -m MODULE ARGS` process."""
    for target, fd in zip((0, 1, 2), request["fds"], strict=True):
        os.dup2(fd, target)
        os.close(fd)
    env = dict(request["env"])
    env.pop(ENV, None)  # processes the stage starts run cold
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(env)
    for signum in FORWARDED:
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _fresh_streams()
    pythonpath = [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [os.getcwd(), *pythonpath, *base_path]
    for name in [m for m in sys.modules if m.split(".")[0] in OWN_PACKAGES]:
        del sys.modules[name]
    importlib.invalidate_caches()
    _reseed()
    STAGE.update(module=request["module"], args=request["args"])


def _fresh_streams() -> None:
    """stdin/stdout/stderr as a new interpreter would open them on the caller's descriptors."""
    import io

    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    streams = []
    for fd, mode in ((0, "r"), (1, "w"), (2, "w")):
        old = (sys.stdin, sys.stdout, sys.stderr)[fd]
        tty = os.isatty(fd)
        buffered = open(fd, mode + "b", closefd=False, buffering=0 if (unbuffered and mode == "w") else -1)
        if isinstance(buffered, io.FileIO) and mode == "w":
            buffered = io.BufferedWriter(buffered)
        streams.append(
            io.TextIOWrapper(
                buffered,
                encoding=getattr(old, "encoding", None) or "utf-8",
                errors="backslashreplace" if fd == 2 else getattr(old, "errors", None),
                line_buffering=tty or fd == 2,
                write_through=fd == 2 or unbuffered,
            )
        )
    sys.stdin, sys.stdout, sys.stderr = streams
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = streams


def _reseed() -> None:
    """A fresh process draws new random state; a fork would share the runner's."""
    import random

    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if "torch" in sys.modules:
        sys.modules["torch"].seed()


def _run_stage() -> None:
    """Run the stage as `python -m` would, then end the process as the interpreter does, less the teardown of every
    module the runner imported (seconds, for nothing the stage left to do: atexit handlers and stream flushes run)."""
    import atexit
    import runpy
    import types

    module, args = STAGE["module"], STAGE["args"]
    sys.orig_argv = [sys.executable, "-m", module, *args]
    sys.argv = ["-m", *args]
    sys.modules["__main__"] = types.ModuleType("__main__")
    interrupted = False
    try:
        runpy._run_module_as_main(module, alter_argv=True)  # noqa: SLF001 - exactly what `python -m` runs
        code = 0
    except SystemExit as stop:
        code = _exit_code(stop.code)
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        code, interrupted = 130, True
    except BaseException:  # noqa: BLE001 - the interpreter's own last resort: print it, exit 1
        sys.excepthook(*sys.exc_info())
        code = 1
    with contextlib.suppress(BaseException):
        threading._shutdown()  # noqa: SLF001 - joins non-daemon threads, as the interpreter's exit does
    atexit._run_exitfuncs()  # noqa: SLF001
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    if interrupted:  # as the interpreter ends on an uncaught Ctrl-C: by the signal, so the caller sees it
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)


def _exit_code(code: object) -> int:
    """SystemExit's code as the interpreter reads it: None is 0, an int is itself, anything else is printed, 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    with contextlib.suppress(Exception):
        print(code, file=sys.stderr)
    return 1


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    def stop(_signum, _frame):
        raise KeyboardInterrupt

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def main(path: str = DEFAULT_SOCKET, quiet: bool = False, modules: Iterable[str] = PRELOAD) -> None:
    """Preload `modules`, listen on `path` until SIGTERM/SIGINT, then remove the socket."""
    started = time.perf_counter()
    runner = Runner(path, quiet)
    missing = runner.preload(modules)
    runner.bind()
    if not quiet:
        extra = f" ({', '.join(missing)} not installed)" if missing else ""
        print(f"tunegate warm: libraries imported in {time.perf_counter() - started:.1f} s{extra}", flush=True)
        print(f"export {ENV}={runner.path}", flush=True)
        if threads() > 1:
            print(f"tunegate warm: an import left {threads() - 1} thread(s) running: every stage runs cold", flush=True)
    try:
        with _stop_on_signals():
            runner.serve_forever()
    except KeyboardInterrupt:
        runner.close()
        return
    _run_stage()  # serve_forever returns only in a forked stage


if __name__ == "__main__":
    main(*(sys.argv[1:2] or [DEFAULT_SOCKET]))
