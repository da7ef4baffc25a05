"""Paths a user gives: local (relative or absolute) or `gs://...`, all through etils.epath.

A pod's workers have separate disks and share only GCS, so every folder a run reads or writes
may be a bucket. The entry point resolves each path of the config once
(`resolve_config_paths`): `~` expanded, a relative path made absolute against the current
directory (orbax refuses relative checkpoint paths, and a path must mean the same thing in
every process and on every resume), `gs://` URIs, `builtin:` names and hub ids unchanged.
Code after that opens everything with `as_path` (an epath.Path: the same calls for a local
folder and a bucket); libraries that read only local files get a local copy
(`local_folder`).
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid
from typing import Any, Union

from etils import epath

PathLike = Union[str, os.PathLike]
REMOTE_PREFIXES = ("gs://",)
BUILTIN_PREFIX = "builtin:"
# Config keys that name files or folders (a key missing from a config is skipped).
PATH_KEYS = ("data.images", "data.concepts", "data.root", "data.tfds_dir", "concept",
             "global_checkpoint", "encoder", "images", "masks")
# Config keys that name a model: a local folder, or else a hub id ("org/name"), which looks
# like a relative path and is left as it is unless such a local folder exists.
MODEL_KEYS = ("model", "image_encoder")


def is_remote(path: PathLike) -> bool:
    return str(path).startswith(REMOTE_PREFIXES)


def as_path(path: PathLike) -> epath.Path:
    return epath.Path(path)


def resolve(path: PathLike) -> str:
    """`path` as the same absolute location from any current directory ("" stays "")."""
    text = os.fspath(path) if not isinstance(path, str) else path
    if not text or is_remote(text) or text.startswith(BUILTIN_PREFIX):
        return text
    return os.fspath(epath.Path(text).expanduser().resolve())


def resolve_model(name_or_path: str) -> str:
    """A model reference: an existing local folder made absolute, anything else unchanged."""
    if not name_or_path or is_remote(name_or_path) or name_or_path.startswith(BUILTIN_PREFIX):
        return name_or_path
    local = epath.Path(name_or_path).expanduser()
    return resolve(local) if local.exists() else name_or_path


def _get(config: Any, dotted: str) -> tuple[Any, str] | None:
    """(the ConfigDict holding `dotted`'s last part, that part), or None if absent."""
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        if part not in node:
            return None
        node = node[part]
    return (node, leaf) if hasattr(node, "keys") and leaf in node else None


def resolve_config_paths(config: Any) -> None:
    """Resolves, in place, every path and model key the config has (see the module doc)."""
    for keys, resolver in ((PATH_KEYS, resolve), (MODEL_KEYS, resolve_model)):
        for key in keys:
            found = _get(config, key)
            if found is not None and isinstance(found[0][found[1]], str):
                found[0][found[1]] = resolver(found[0][found[1]])


def write_atomic(path: PathLike, data: bytes | str) -> None:
    """A reader sees the old file or the whole new one, never a part: locally written beside
    `path`, then renamed; a GCS object is atomic by itself (it appears once its upload is
    finalized), and GCS has no rename, only copy and delete."""
    path = as_path(path)
    if is_remote(path):
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.partial")
    if isinstance(data, str):
        partial.write_text(data)
    else:
        partial.write_bytes(data)
    partial.replace(path)


_LOCAL_COPIES: dict[str, str] = {}


def local_folder(folder: PathLike) -> str:
    """A local folder with `folder`'s files: `folder` itself when it is local, else a copy made
    once per process (removed at exit), for libraries that open only local files."""
    if not is_remote(folder):
        return os.fspath(folder)
    key = str(folder)
    if key not in _LOCAL_COPIES:
        target = tempfile.mkdtemp(prefix="spacetime-jax-")
        atexit.register(shutil.rmtree, target, ignore_errors=True)
        _copy_tree(as_path(folder), epath.Path(target))
        _LOCAL_COPIES[key] = target
    return _LOCAL_COPIES[key]


def copy_tree(source: PathLike, target: PathLike) -> None:
    """Copies every file under `source` into `target` (either local or gs://), replacing
    files of the same name and keeping the others."""
    _copy_tree(as_path(source), as_path(target))


def _copy_tree(source: epath.Path, target: epath.Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if entry.is_dir():
            _copy_tree(entry, target / entry.name)
        else:
            (target / entry.name).write_bytes(entry.read_bytes())
