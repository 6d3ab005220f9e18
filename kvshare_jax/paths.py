"""Paths that may be remote (``gs://`` workdirs): every file a run writes or reads goes
through ``etils.epath`` and these helpers, so local and object-store paths behave alike."""

from __future__ import annotations

import importlib.util
import io
import json
import uuid
from typing import Any

from etils import epath

# URI scheme -> (module that serves it, the extra that installs it)
_FILESYSTEMS = {"gs": ("gcsfs", "gcs"), "s3": ("s3fs", "s3"), "az": ("adlfs", "az")}


def is_remote(path: str | epath.Path) -> bool:
    """True for a URI (``gs://bucket/run``), False for a local path."""
    return "://" in str(path)


def require_filesystem(path: str | epath.Path) -> None:
    """``ValueError`` naming the extra to install when ``path``'s scheme needs a package
    that is missing (``gs://`` without gcsfs), before any work starts."""
    scheme = str(path).split("://", 1)[0] if is_remote(path) else ""
    if scheme in _FILESYSTEMS:
        module, extra = _FILESYSTEMS[scheme]
        if importlib.util.find_spec(module) is None:
            raise ValueError(
                f"{path}: {scheme}:// paths need {module}; install it with "
                f"pip install 'kvshare_jax[{extra}]'"
            )


def join(path: str | epath.Path, *parts: str) -> str:
    """``path/part/...`` as a string (keeps ``gs://``; no ``os.path`` on URIs)."""
    return str(epath.Path(path).joinpath(*parts))


def absolute(path: str) -> str:
    """An absolute local path, or the URI unchanged."""
    return path if is_remote(path) else str(epath.Path(path).absolute())


def write_text(path: str | epath.Path, text: str) -> None:
    """Writes ``text`` whole (see :func:`write_bytes`)."""
    write_bytes(path, text.encode())


def write_bytes(path: str | epath.Path, data: bytes) -> None:
    """Writes ``data`` whole: locally through a temporary file of a unique name and a
    rename (atomic, also beside concurrent writers), while remote objects are replaced
    whole by the store. Creates the parent directory."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(path):
        path.write_bytes(data)
        return
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    tmp.write_bytes(data)
    tmp.replace(path)


def write_json(path: str | epath.Path, obj: Any, sort_keys: bool = False) -> None:
    """``obj`` as indented JSON (see :func:`write_text`)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def read_json(path: str | epath.Path) -> Any:
    return json.loads(epath.Path(path).read_text())


def save_figure(fig: Any, path: str | epath.Path, dpi: int = 110) -> None:
    """Saves a matplotlib figure as PNG to a local or remote ``path``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
