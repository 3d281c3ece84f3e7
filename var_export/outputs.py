"""Outputs the tool writes: ownership, staging, all-or-nothing replacement, stale-temp cleanup.

Every file or folder var-export writes (bundle, Triton repository, engines, inspect folders,
rewrite outputs, calibration.json) goes through this module::

    check_target(out_dir, kind="dir")        # up front, before any work: may we replace it?
    with Outputs() as tx:                    # one transaction for all outputs of a run
        stage = tx.stage_dir(out_dir)        # an empty folder beside out_dir: fill it
        plan = tx.stage_file(out_plan)       # a path beside out_plan: write the file there
        work = tx.scratch(out_dir.parent)    # scratch space, removed at the end
        ...
        tx.commit()                          # swap every output into place, or none

Rules:

* **Ownership.** A folder var-export writes holds a marker file ``.var-export-owned`` (JSON,
  :class:`var_export.core.schemas.OwnedMarker`) listing every file it wrote there. An existing
  folder is replaced only when it is empty, or its marker lists every file in it; an existing
  file only when the marker of its folder lists it. Symlinks, a folder where a file is expected
  (and the reverse), a parent that is a file or is not writable are refused with what was found.
* **All or nothing.** Outputs are built in a staging folder ``.var-export-tmp-<pid>-<token>``
  beside them (same filesystem, so renames are atomic). ``commit`` moves each old output into
  the staging folder, then the new one into place; any failure moves everything back. Leaving the
  ``with`` block without ``commit`` (an error, Ctrl-C) removes the staging folders. Filesystem
  errors (disk full, read-only, ...) become :class:`OutputError` saying nothing was replaced.
* **SIGKILL.** A staging folder records its owner (pid, host, process start time). The next run
  writing in that place removes staging folders whose owner is gone, first moving back an old
  output that a killed ``commit`` had already moved aside.

Torch-free and onnx-free: only the standard library and pydantic (through core.schemas).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Literal

from var_export.core.contract import OWNED_MARKER, STAGE_PREFIX
from var_export.core.errors import OutputError, VarExportError

__all__ = [
    "OWNED_MARKER",
    "Outputs",
    "check_target",
    "claim",
    "write_error",
    "owned_files",
    "sweep_stale",
]

log = logging.getLogger(__name__)

Kind = Literal["dir", "file"]
_OWNER = "owner.json"  # inside a staging folder: who created it
_OLD = ".old-"  # prefix of an old output moved aside into the staging folder during commit
_STAGE_RE = re.compile(re.escape(STAGE_PREFIX) + r"(\d+)-([0-9a-f]+)$")


# ---------------------------------------------------------------------------------------------
# Ownership


def owned_files(folder: Path) -> set[str] | None:
    """The files the marker of ``folder`` lists (POSIX relative paths), None without a marker."""
    from var_export.core.schemas import OwnedMarker, parse_json_file

    marker = Path(folder) / OWNED_MARKER
    if not marker.is_file():
        return None
    try:
        return set(parse_json_file(marker, OwnedMarker, OutputError).files)
    except OutputError as exc:
        log.warning("ignoring an unreadable ownership marker: %s", exc)
        return None


def _files_in(folder: Path) -> list[str]:
    out = []
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            rel = Path(root, name).relative_to(folder).as_posix()
            if rel != OWNED_MARKER:
                out.append(rel)
    return sorted(out)


def _write_marker(folder: Path, files: Iterable[str]) -> None:
    from var_export.core.schemas import OwnedMarker

    marker = OwnedMarker(files=sorted(set(files)))
    tmp = folder / f"{OWNED_MARKER}.{os.getpid()}.tmp"
    tmp.write_text(marker.model_dump_json(indent=1) + "\n")
    os.replace(tmp, folder / OWNED_MARKER)


def _check_parent(path: Path) -> None:
    """The nearest existing ancestor of ``path`` must be a writable folder."""
    for anc in path.parents:
        if os.path.lexists(anc):
            if not anc.is_dir():
                raise OutputError(
                    f"cannot write {path}: {anc} is a file, expected a folder. Choose an --out "
                    "whose parent folders are folders (or can be created)."
                )
            if not os.access(anc, os.W_OK | os.X_OK):
                raise OutputError(
                    f"cannot write {path}: the folder {anc} is not writable. Choose another --out "
                    "or fix the folder's permissions."
                )
            return


def check_target(path: str | os.PathLike[str], kind: Kind = "dir", *, what: str = "output") -> Path:
    """Refuse, before any work, an output ``path`` that var-export may not create or replace.

    ``kind``: ``"dir"`` (a folder output) or ``"file"``. Returns ``path`` as a Path. Also
    removes staging folders of killed runs beside it (:func:`sweep_stale`).
    """
    path = Path(path)
    if not path.name or path.name in (".", ".."):
        raise OutputError(f"the {what} path {str(path)!r} names no file or folder; give a name.")
    _check_parent(path)
    if path.parent.is_dir():
        sweep_stale(path.parent)
    if os.path.islink(path):
        raise OutputError(
            f"the {what} {path} is a symlink (to {os.readlink(path)!r}); refusing to replace or write "
            "through it. Give the real path, or remove the link yourself."
        )
    if not os.path.lexists(path):
        return path
    if kind == "dir":
        if not path.is_dir():
            raise OutputError(
                f"the {what} {path} exists and is a file; expected a folder (new, empty, or written "
                "by var-export). Choose another path or remove the file yourself."
            )
        present = _files_in(path)
        if not present:
            return path
        owned = owned_files(path)
        foreign = [f for f in present if owned is None or f not in owned]
        if foreign:
            why = (f"it has no {OWNED_MARKER} marker" if owned is None
                   else f"{len(foreign)} of its files were not written by var-export")
            raise OutputError(
                f"refusing to replace the {what} {path}: {why} (found {len(present)} files, e.g. "
                f"{', '.join(foreign[:4])}). var-export replaces only folders it wrote itself. "
                "Choose another path, or move or remove the folder yourself."
            )
        return path
    if path.is_dir():
        raise OutputError(
            f"the {what} {path} is a folder; expected a file path (e.g. {path / 'model.onnx'}). "
            "Choose a file name."
        )
    owned = owned_files(path.parent)
    if owned is None or path.name not in owned:
        raise OutputError(
            f"refusing to replace {path}: the file exists and was not written by var-export (not "
            f"listed in {path.parent / OWNED_MARKER}). Choose another path or remove it yourself."
        )
    return path


# ---------------------------------------------------------------------------------------------
# Staging folders and stale ones


def _start_time(pid: int) -> str | None:
    """The process start time (clock ticks since boot) from /proc, to tell a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _owner_alive(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname():
        return True  # another machine (shared filesystem): never ours to judge
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = owner.get("start")
    return started is None or _start_time(pid) in (None, started)


def sweep_stale(parent: str | os.PathLike[str]) -> list[Path]:
    """Remove staging folders in ``parent`` whose owning process is gone; returns them.

    An old output that a killed run had moved aside (``.old-NAME``) is moved back first when
    nothing took its place.
    """
    parent = Path(parent)
    removed: list[Path] = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not _STAGE_RE.match(entry.name) or not entry.is_dir() or entry.is_symlink():
            continue
        try:
            owner = json.loads((entry / _OWNER).read_text())
        except (OSError, ValueError):
            owner = {"pid": int(_STAGE_RE.match(entry.name).group(1)), "host": socket.gethostname()}
        if not isinstance(owner, dict) or _owner_alive(owner):
            continue
        for old in entry.glob(_OLD + "*"):
            final = parent / old.name[len(_OLD):]
            if not os.path.lexists(final):
                with contextlib.suppress(OSError):
                    os.rename(old, final)
                    log.warning("restored %s, moved aside by a killed var-export run", final)
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            removed.append(entry)
            log.info("removed %s, left by a killed var-export run (pid %s)", entry, owner.get("pid"))
    return removed


def _new_stage(parent: Path) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(parent)
    stage = parent / f"{STAGE_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid())}
    try:
        with open(stage / _OWNER, "w") as f:
            f.write(json.dumps(owner))
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return stage


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _explain(exc: OSError, targets: list[Path]) -> str:
    hint = {
        errno.ENOSPC: "the disk is full: free space or choose another --out",
        errno.EDQUOT: "the disk quota is exhausted: free space or choose another --out",
        errno.EROFS: "the filesystem is read-only: choose a writable --out",
        errno.EACCES: "permission denied: choose a writable --out or fix the permissions",
        errno.EPERM: "operation not permitted: choose a writable --out or fix the permissions",
        errno.ENOTDIR: "a parent of the path is a file, not a folder",
        errno.EISDIR: "a folder is where a file is expected",
    }.get(exc.errno or 0, "see the message above")
    where = f" ({exc.filename})" if exc.filename else ""
    names = ", ".join(str(t) for t in targets) or "the output"
    return (
        f"could not write {names}: {exc.strerror or exc}{where}; {hint}. Nothing was replaced: "
        "previous outputs, if any, are as they were."
    )


def write_error(exc: OSError, targets: list[Path]) -> OutputError:
    """The OutputError for a filesystem error while writing ``targets`` (for writers that stage
    their files themselves, e.g. var_export.rewrite)."""
    return OutputError(_explain(exc, [Path(t) for t in targets]))


def claim(files: Iterable[str | os.PathLike[str]]) -> None:
    """Record files var-export just wrote (atomically, by its own means) in their folder's marker."""
    by_folder: dict[Path, set[str]] = {}
    for f in files:
        by_folder.setdefault(Path(f).parent, set()).add(Path(f).name)
    for folder, names in by_folder.items():
        _write_marker(folder, (owned_files(folder) or set()) | names)


# ---------------------------------------------------------------------------------------------
# The transaction


class Outputs:
    """All outputs of one run, staged beside their targets and swapped in together.

    Use as a context manager; see the module docstring. Each target is checked with
    :func:`check_target` when staged (so call that up front too, before the expensive work).
    """

    def __init__(self) -> None:
        self._stages: dict[Path, Path] = {}  # parent folder -> staging folder
        self._items: list[tuple[Path, Path, Kind]] = []  # (target, staged path, kind)
        self._committed = False

    def __enter__(self) -> Outputs:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
        if isinstance(exc, OSError) and not isinstance(exc, VarExportError):
            raise OutputError(_explain(exc, self.targets)) from exc

    @property
    def targets(self) -> list[Path]:
        return [t for t, _, _ in self._items]

    def _stage_in(self, parent: Path) -> Path:
        key = Path(os.path.abspath(parent))
        if key not in self._stages:
            try:
                self._stages[key] = _new_stage(key)
            except OSError as exc:
                raise OutputError(_explain(exc, [parent])) from exc
        return self._stages[key]

    def _add(self, target: str | os.PathLike[str], kind: Kind, what: str) -> Path:
        target = check_target(target, kind, what=what)
        if any(os.path.abspath(t) == os.path.abspath(target) for t in self.targets):
            raise OutputError(f"{target} is written twice by this run; give distinct outputs.")
        staged = self._stage_in(target.parent) / target.name
        if kind == "dir":
            staged.mkdir()
        self._items.append((target, staged, kind))
        return staged

    def stage_dir(self, target: str | os.PathLike[str], *, what: str = "output folder") -> Path:
        """An empty folder to fill; it becomes ``target`` on commit."""
        return self._add(target, "dir", what)

    def stage_file(self, target: str | os.PathLike[str], *, what: str = "output file") -> Path:
        """A path to write; the file becomes ``target`` on commit (its folder's marker lists it)."""
        return self._add(target, "file", what)

    def scratch(self, parent: str | os.PathLike[str]) -> Path:
        """A fresh scratch folder in the staging area of ``parent``, removed with it."""
        path = self._stage_in(Path(parent)) / f"scratch-{uuid.uuid4().hex[:6]}"
        path.mkdir()
        return path

    def commit(self) -> list[Path]:
        """Move every staged output into place (old ones aside first); all or none."""
        for target, staged, kind in self._items:
            if not os.path.lexists(staged) or (kind == "file") == staged.is_dir():
                raise OutputError(f"nothing was staged for {target}; this is a bug.")
        done: list[list] = []  # [target, backup or None, placed]
        try:
            for target, staged, kind in self._items:
                if kind == "dir":
                    _write_marker(staged, _files_in(staged))
                step = [target, None, False]
                done.append(step)
                if os.path.lexists(target):
                    step[1] = staged.parent / f"{_OLD}{target.name}"
                    os.rename(target, step[1])
                os.rename(staged, target)
                step[2] = True
            for target, _, kind in self._items:
                if kind == "file":
                    _write_marker(target.parent, (owned_files(target.parent) or set()) | {target.name})
        except BaseException as exc:
            for target, backup, placed in reversed(done):
                with contextlib.suppress(OSError):
                    if placed:
                        _remove(target)
                    if backup is not None and os.path.lexists(backup):
                        os.rename(backup, target)
            if isinstance(exc, OSError):
                raise OutputError(_explain(exc, self.targets)) from exc
            raise
        self._committed = True
        log.debug("committed %s", [str(t) for t in self.targets])
        return self.targets

    def close(self) -> None:
        """Remove the staging folders (and, after a commit, the old outputs moved into them)."""
        for stage in self._stages.values():
            shutil.rmtree(stage, ignore_errors=True)
        self._stages.clear()


@contextlib.contextmanager
def scratch_dir(parent: str | os.PathLike[str]) -> Iterator[Path]:
    """A scratch folder in ``parent`` that a killed run's successor removes (pid-stamped)."""
    with Outputs() as tx:
        yield tx.scratch(Path(parent))
