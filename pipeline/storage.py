"""Where caches live: a local directory, or any fsspec URL (``s3://bucket/prefix``, ``gs://``, ``memory://``).

A :class:`Location` is a URL plus fsspec storage options. It is small and picklable, so the
driver hands it to Ray workers, which open the same store themselves. Credentials are never
part of it: fsspec backends read them from the environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ...) on whichever machine opens the store, so
they never reach a config, a cache's attributes or a run record.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import traceback
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from unipt.pipeline.errors import UniptError

if TYPE_CHECKING:
    from zarr.abc.store import Store

# Option names that carry secrets, compared lower-case without "_" and "-": refused in configs at any
# depth, so they cannot end up in config.yaml, run records or the registry. A name is a secret if it
# contains one of these words (client_secret, aws_session_token, sas_token, db_password, api_key) ...
_SECRET_WORDS = ("secret", "token", "password", "passwd", "credential", "connectionstring", "apikey", "sas")
# ... or ends with "key" (key, SSECustomerKey, account_key, access_key), except names of key *ids* or
# settings that only point at a key.
_NOT_SECRET = ("keyid", "keyarn", "kmskeyid", "keyname", "keytype")
# user:password@ in a URL (s3://user:pass@host/..., https://user:pass@endpoint).
_URL_PASSWORD = re.compile(r"^[a-z][a-z0-9+.-]*://[^/@\s:]*:[^/@\s]*@", re.IGNORECASE)


class Location:
    """A directory-like place: a local path or an fsspec URL, with the file operations the cache needs."""

    def __init__(self, url: str | Path, options: Mapping[str, Any] | None = None) -> None:
        text = str(url)
        if text.startswith("file://"):
            text = text[len("file://") :]
        if "://" in text:
            self.url = text.rstrip("/")
        else:
            self.url = str(Path(text).expanduser().resolve())
        check_url(text, "cache location")
        self.options = dict(options or {})
        check_no_secrets(self.options)
        self._fs: fsspec.AbstractFileSystem | None = None

    @classmethod
    def _exact(cls, url: str, options: dict[str, Any]) -> Location:
        """A location at exactly ``url``, with no path resolved: a child of a checked location. Resolving
        would follow a symbolic link inside a cache root to wherever it points (and gc would then delete
        the target), so only the path a user names is resolved, never the names below it."""
        location = cls.__new__(cls)
        location.url, location.options, location._fs = url, dict(options), None
        return location

    def __reduce__(self) -> tuple:
        # Ship only the URL and options; the worker opens its own filesystem (and reads its own credentials).
        return (Location._exact, (self.url, self.options))

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def __str__(self) -> str:
        return self.url

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and (self.url, self.options) == (other.url, other.options)

    def __hash__(self) -> int:
        return hash(self.url)

    @property
    def is_local(self) -> bool:
        return "://" not in self.url

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            if self.is_local:
                self._fs = LocalFileSystem()
            else:
                try:
                    self._fs = fsspec.core.url_to_fs(self.url, **self.options)[0]
                except ImportError as exc:
                    scheme = self.url.split("://", 1)[0]
                    raise UniptError(
                        f"no fsspec backend for {scheme}:// ({exc}); install it, e.g. `pip install s3fs`"
                    ) from exc
                except TypeError as exc:  # an option the backend does not take
                    scheme = self.url.split("://", 1)[0]
                    raise UniptError(
                        f"storage.options: the {scheme}:// filesystem refused them ({exc}); remove or rename "
                        "that option (see the backend's fsspec documentation)"
                    ) from None
        return self._fs

    @property
    def fs_path(self) -> str:
        return self.url if self.is_local else self.fs._strip_protocol(self.url)

    def child(self, *parts: str) -> Location:
        for part in parts:
            if "\\" in part or any(piece in ("", ".", "..") for piece in part.split("/")):
                raise UniptError(f"path part {part!r} would leave {self.url}; names must stay inside it")
        return Location._exact(self.url + "/" + "/".join(parts), self.options)

    def symlink_below(self, root: Location) -> str | None:
        """The first entry on the way from ``root`` down to this location (itself included) that is a
        symbolic link, or None (object stores have no links). Checked with ``lstat``, never followed."""
        if not self.is_local:
            return None
        prefix = root.url.rstrip("/") + "/"
        if not self.url.startswith(prefix):
            raise ValueError(f"{self.url} is not inside {root.url}")
        path = root.url
        for part in self.url[len(prefix) :].split("/"):
            path = os.path.join(path, part)
            try:
                if stat.S_ISLNK(os.lstat(path).st_mode):
                    return path
            except FileNotFoundError:
                return None
        return None

    # --- small files -------------------------------------------------------------------------------------
    def exists(self) -> bool:
        return os.path.exists(self.url) if self.is_local else self.fs.exists(self.fs_path)

    def read_bytes(self) -> bytes:
        try:
            return self.fs.cat_file(self.fs_path)
        except FileNotFoundError as exc:
            raise FileNotFoundError(self.url) from exc

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_bytes(self, data: bytes) -> None:
        """Write a whole file so that readers see either the old content or the new, never a torn file."""
        if self.is_local:
            os.makedirs(os.path.dirname(self.url), exist_ok=True)
            tmp = f"{self.url}.{uuid.uuid4().hex}.tmp"
            try:
                with open(tmp, "wb") as handle:
                    handle.write(data)
                os.replace(tmp, self.url)
            except BaseException:
                # A full disk fails the write midway: leave no stray half file behind.
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        else:
            self.fs.pipe_file(self.fs_path, data)  # one PUT: object stores publish it whole

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    # --- directories -------------------------------------------------------------------------------------
    def listdir(self) -> list[str]:
        """Names of the entries directly inside, sorted; empty if the location does not exist."""
        if self.is_local:
            return sorted(os.listdir(self.url)) if os.path.isdir(self.url) else []
        try:
            entries = self.fs.ls(self.fs_path, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def files(self) -> dict[str, int]:
        """Every file below, as path relative to this location -> size in bytes."""
        if self.is_local:
            return _local_files(self.url)
        base = self.fs_path.rstrip("/") + "/"
        try:
            found = self.fs.find(self.fs_path, detail=True)
        except FileNotFoundError:
            return {}
        return {path[len(base) :]: int(info.get("size") or 0) for path, info in found.items()}

    def size(self) -> int:
        return sum(self.files().values())

    def remove(self) -> None:
        """Delete what is at this location. Locally a symbolic link is unlinked itself, never its target,
        and links inside a removed folder are unlinked as entries (``shutil.rmtree`` does not follow them)."""
        if not self.is_local:
            if self.exists():
                self.fs.rm(self.fs_path, recursive=True)
            return
        try:
            mode = os.lstat(self.url).st_mode
        except FileNotFoundError:
            return
        try:
            if stat.S_ISDIR(mode):
                shutil.rmtree(self.url, onerror=_gone_is_fine)
            else:
                os.unlink(self.url)
        except FileNotFoundError:
            pass  # removed meanwhile by another gc: what we wanted

    def zarr_store(self, read_only: bool = False) -> Store:
        # zarr here, not at the top: the CLI's commands that read no cache (`--help`, `runs`) import this
        # module for its default paths, and zarr is a third of a second.
        from zarr.storage import FsspecStore, LocalStore

        if self.is_local:
            return LocalStore(self.url, read_only=read_only)
        return FsspecStore.from_url(self.url, storage_options=self.options, read_only=read_only)


def _gone_is_fine(function: Callable[..., Any], path: str, info: tuple) -> None:
    """``shutil.rmtree``'s error handler: an entry another process deleted first is not an error."""
    if not isinstance(info[1], FileNotFoundError):
        raise info[1]


def looks_secret(name: str) -> bool:
    """True for option names that carry credentials (see ``_SECRET_WORDS``)."""
    flat = re.sub(r"[_\-\s]", "", name.lower())
    if flat.endswith(_NOT_SECRET):
        return False
    return flat.endswith("key") or any(word in flat for word in _SECRET_WORDS)


def check_url(url: str, where: str) -> None:
    """Refuse a URL carrying ``user:password@`` (never echoing it)."""
    if _URL_PASSWORD.match(url.strip()):
        raise UniptError(
            f"{where} carries a user:password@ in its URL; remove it and put the credentials in the "
            "environment (e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), never in a config"
        )


def check_no_secrets(options: Mapping[str, Any]) -> None:
    """Refuse storage options that hold a credential anywhere (a secret-like key at any depth, or a URL
    with a password), naming where but never the value."""

    def walk(node: Any, where: str) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                if looks_secret(str(key)):
                    raise UniptError(
                        f"storage option {where}{key} looks like a credential; put it in the environment "
                        "(e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN), never in a "
                        "config"
                    )
                walk(value, f"{where}{key}.")
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                walk(value, f"{where.rstrip('.')}[{i}].")
        elif isinstance(node, str):
            check_url(node, f"storage option {where.rstrip('.')}")

    walk(options, "")


# Exception class names (by name: their packages are optional) that mean "no usable credentials".
_CREDENTIAL_ERRORS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError")
# Client packages whose TypeError means an option they do not take.
_STORE_PACKAGES = ("fsspec", "s3fs", "gcsfs", "adlfs", "aiobotocore", "botocore")


def explain_storage_error(exc: BaseException) -> UniptError | None:
    """One line for an object store's missing credentials, or None if ``exc`` is something else."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, TypeError) and "unexpected keyword argument" in str(current):
            # Backends such as s3fs take unknown options silently and fail on the first request.
            files = [frame.filename for frame in traceback.extract_tb(current.__traceback__)]
            if any(f"{os.sep}{package}{os.sep}" in name for name in files for package in _STORE_PACKAGES):
                return UniptError(
                    f"storage.options: the object store's client refused them ({current}); remove or "
                    "rename that option (see the backend's fsspec documentation)"
                )
        if type(current).__name__ in _CREDENTIAL_ERRORS:
            return UniptError(
                f"the object store refused the request: {type(current).__name__} ({current}); set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (plus AWS_ENDPOINT_URL for an S3-compatible "
                "store) in the environment, or use a local cache root"
            )
        current = current.__cause__ or current.__context__
    return None


def unipt_home() -> str:
    """Where caches, runs and the registry live when the config names no place: ``$UNIPT_HOME``, else
    ``.unipt`` in the working directory. Set UNIPT_HOME so every command finds them wherever it runs."""
    return os.environ.get("UNIPT_HOME") or ".unipt"


DEFAULT_CACHE_ROOT = f"{unipt_home()}/cache"
DEFAULT_RUNS_ROOT = f"{unipt_home()}/runs"
DEFAULT_REGISTRY = f"{unipt_home()}/registry.sqlite"


def _local_files(folder: str) -> dict[str, int]:
    """Files below ``folder`` -> sizes, tolerating files and folders that vanish while it walks (a
    store committed, compacted or collected by another process meanwhile): what is gone is not listed.
    Links are not followed (``os.walk`` lists a linked folder as an entry and does not descend)."""
    found = {}
    for parent, _folders, names in os.walk(folder):  # os.walk skips folders it cannot list
        for name in names:
            path = os.path.join(parent, name)
            try:
                info = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(info.st_mode):
                found[os.path.relpath(path, folder).replace(os.sep, "/")] = info.st_size
    return found
