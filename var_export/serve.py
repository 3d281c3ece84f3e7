"""Run a real ``tritonserver`` on a bundle: ``var-export serve BUNDLE``.

    with TritonServer("build/tiny-llava") as server:      # repository in a temp folder
        print(server.grpc_url, server.http_url)           # localhost, ready to serve
        ...                                                # stop(): SIGTERM, no process left

Where the server comes from (:func:`find_tritonserver`): the ``tritonserver`` binary that the
``nvidia-pytriton`` wheel carries (Python backend only; CPU works), else one on PATH with its
backends in ``/opt/tritonserver/backends`` (an NGC container). What the pytriton build needs,
found by trying it as a new user:

* the Python-backend stub built for the running Python must sit in the backend's folder: the
  backend folder is assembled in the workspace (the backend library, its utils, the stub);
* the server needs the wheel's bundled libraries (``nvidia_pytriton.libs``) on LD_LIBRARY_PATH;
* the stub finds its Python packages from PATH (this interpreter's folder goes first) and
  does not inherit PYTHONPATH; it embeds its own CPython patch release, so the model only
  forwards requests to a worker in this interpreter (var_export/serve_worker.py);
* the Triton 2.51 stub garbles TYPE_STRING tensors with numpy 2: when this environment's numpy
  is 2, a private numpy<2 (:func:`stub_numpy_dir`) goes first on the model's sys.path.

Everything is bound to 127.0.0.1. ``stop`` sends SIGTERM (Triton unloads the model, which stops
its stub), waits, kills whatever of the process tree is left, and removes the workspace.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from var_export.core.errors import ServeError
from var_export.triton import DEFAULT_MAX_BATCH, MODEL_NAME, write_triton_repository

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
NUMPY_PIN = "numpy<2"
STUB_NUMPY_ENV = "VAR_EXPORT_STUB_NUMPY"  # a folder holding numpy<2 for the stub (overrides the cache)


@dataclass
class TritonInstall:
    """A tritonserver binary with what it needs to run the Python backend."""

    binary: Path
    python_backend: Path  # folder with libtriton_python.so and triton_python_backend_utils.py
    stub: Path | None  # triton_python_backend_stub for this Python (None: already in python_backend)
    libs: list[Path]  # extra LD_LIBRARY_PATH entries
    source: str  # "nvidia-pytriton" | "PATH"


def find_tritonserver(binary: str | os.PathLike[str] | None = None) -> TritonInstall:
    """The server to run: ``binary`` if given, else nvidia-pytriton's, else ``tritonserver`` on PATH."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    spec = importlib.util.find_spec("pytriton")
    if binary is None and spec is not None and spec.origin is not None:
        root = Path(spec.origin).parent / "tritonserver"
        stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise ServeError(
                f"nvidia-pytriton has no Python-backend stub for Python {version} (looked at {stub}); "
                "use a Python it ships stubs for (3.8-3.13) or a tritonserver on PATH."
            )
        libs = Path(spec.origin).parent.parent / "nvidia_pytriton.libs"
        return TritonInstall(root / "bin" / "tritonserver", root / "backends" / "python", stub,
                             [libs] if libs.is_dir() else [], "nvidia-pytriton")
    found = Path(binary) if binary is not None else shutil.which("tritonserver")
    if found is None or not Path(found).is_file():
        raise ServeError(
            "expected a Triton server: none found (nvidia-pytriton is not installed and no "
            "tritonserver is on PATH). pip install nvidia-pytriton (var-export[serve]), or run "
            "inside an NGC tritonserver container, or pass --tritonserver PATH."
        )
    backends = Path(found).resolve().parent.parent / "backends" / "python"
    for candidate in (backends, Path("/opt/tritonserver/backends/python")):
        if (candidate / "libtriton_python.so").is_file():
            return TritonInstall(Path(found), candidate, None, [], "PATH")
    raise ServeError(
        f"found {found} but no Python backend beside it (looked for {backends}/libtriton_python.so "
        "and /opt/tritonserver/backends/python); var_llava needs Triton's Python backend."
    )


def stub_numpy_dir(*, install: bool = True) -> Path | None:
    """A folder with numpy<2 for the stub when this environment's numpy is 2, else None.

    ``$VAR_EXPORT_STUB_NUMPY`` names one; otherwise it is a cache folder filled once with
    ``pip install --target DIR 'numpy<2'`` (needs the package registry the first time).
    """
    import numpy

    if int(numpy.__version__.split(".")[0]) < 2:
        return None
    given = os.environ.get(STUB_NUMPY_ENV)
    if given:
        if not (Path(given) / "numpy").is_dir():
            raise ServeError(f"${STUB_NUMPY_ENV}={given} has no numpy package; expected a folder from "
                             f"pip install --target {given} '{NUMPY_PIN}'.")
        return Path(given)
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "var-export" / f"stub-numpy1-{tag}"
    if (cache / "numpy").is_dir():
        return cache
    if not install:
        raise ServeError(f"the stub needs {NUMPY_PIN}; run: {sys.executable} -m pip install --target {cache} '{NUMPY_PIN}'")
    log.info("this environment has numpy %s; installing %s for the Triton stub into %s", numpy.__version__, NUMPY_PIN, cache)
    tmp = cache.with_name(cache.name + f".tmp-{os.getpid()}")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(tmp), NUMPY_PIN]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ServeError(
            f"the Triton 2.51 Python stub needs {NUMPY_PIN} and this environment has numpy "
            f"{numpy.__version__}; installing it failed:\n{result.stderr[-800:]}\nRun "
            f"`{' '.join(cmd[:-3])} --target {cache} '{NUMPY_PIN}'` or set ${STUB_NUMPY_ENV}."
        )
    cache.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, cache)
    return cache


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class TritonServer:
    """``tritonserver`` serving ``var_llava`` for one bundle (module doc). A context manager."""

    def __init__(
        self,
        bundle: str | os.PathLike[str],
        *,
        http_port: int | None = None,
        grpc_port: int | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        tritonserver: str | os.PathLike[str] | None = None,
        startup_timeout: float = 180.0,
    ) -> None:
        self.bundle = Path(bundle)
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.max_batch = max_batch
        self.install = find_tritonserver(tritonserver)
        self.startup_timeout = startup_timeout
        self.workdir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    @property
    def http_url(self) -> str:
        return f"{HOST}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def log_path(self) -> Path | None:
        return self.workdir / "tritonserver.log" if self.workdir else None

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- start --------------------------------------------------------------------------------

    def start(self) -> None:
        """Write the repository and backend folder into a workspace, start, wait until ready."""
        from var_export.bundle import load_bundle

        load_bundle(self.bundle, verify=False)  # a clear BundleError before any process starts
        self.workdir = Path(tempfile.mkdtemp(prefix="var-export-serve-"))
        try:
            numpy_dir = stub_numpy_dir()
            repo = write_triton_repository(
                self.bundle, self.workdir / "models", copy_bundle=False, max_batch=self.max_batch,
                stub_sys_path=[str(numpy_dir)] if numpy_dir else [],
            )
            backends = self._backend_dir()
            self._log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
            cmd = [
                str(self.install.binary), f"--model-repository={repo}", f"--backend-directory={backends}",
                f"--http-address={HOST}", f"--http-port={self.http_port}",
                f"--grpc-address={HOST}", f"--grpc-port={self.grpc_port}",
                "--allow-metrics=false", "--disable-auto-complete-config", "--exit-timeout-secs=5",
            ]
            log.info("starting %s (%s)", self.install.binary, self.install.source)
            self.process = subprocess.Popen(
                cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=self._env(),
                start_new_session=True,  # Ctrl-C reaches us, and we stop the server in order
            )
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _backend_dir(self) -> Path:
        """backends/python with the stub for this Python beside the backend library."""
        assert self.workdir is not None
        dst = self.workdir / "backends" / "python"
        dst.mkdir(parents=True)
        for item in self.install.python_backend.iterdir():
            if item.is_file():
                shutil.copy2(item, dst / item.name)
        if self.install.stub is not None:
            shutil.copy2(self.install.stub, dst / "triton_python_backend_stub")
        return dst.parent

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        libs = [str(p) for p in self.install.libs]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")]).strip(os.pathsep)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.pop("PYTHONPATH", None)  # the stub ignores it; environment.json is the one source
        return env

    def _wait_ready(self) -> None:
        url = f"http://{self.http_url}/v2/models/{MODEL_NAME}/ready"
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise ServeError(
                    f"tritonserver exited with code {self.process.returncode} while loading {MODEL_NAME}; "
                    f"its log ends with:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        raise ServeError(f"{MODEL_NAME} was not ready after {self.startup_timeout:.0f} s; log:\n{self.log_tail()}")

    def log_tail(self, lines: int = 12) -> str:
        """The server's error lines and its last lines (what a failed start needs to show)."""
        if self.log_path is None or not self.log_path.is_file():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        errors = [ln for ln in text if ln.startswith("E")][-lines:]
        return "\n".join([*errors, *(ln for ln in text[-lines:] if ln not in errors)])

    # -- run and stop -------------------------------------------------------------------------

    def wait(self, stop: threading.Event, poll_s: float = 0.5) -> None:
        """Block until ``stop`` is set; ServeError when the server dies first."""
        while not stop.wait(poll_s):
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise ServeError(f"tritonserver exited on its own (code {code}); log:\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, wait, kill what is left of the process tree, remove the workspace."""
        proc, self.process = self.process, None
        if proc is not None:
            tree = _descendants(proc.pid)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning("tritonserver did not stop in %.0f s; killing it", timeout)
                    proc.kill()
                    proc.wait(10)
            _kill_all(tree)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def pids(self) -> list[int]:
        """The server and every process it started (stubs), for checks."""
        if self.process is None:
            return []
        return [self.process.pid, *(p.pid for p in _descendants(self.process.pid))]


def _descendants(pid: int) -> list[Any]:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _kill_all(procs: list[Any], grace: float = 3.0) -> None:
    """Processes of the server's tree still alive after it exited (stubs): terminate, then kill."""
    import psutil

    alive = [p for p in procs if p.is_running()]
    for p in alive:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, still = psutil.wait_procs(alive, timeout=grace)
    for p in still:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
