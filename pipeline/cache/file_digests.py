"""sha256 of large files (backbone weights), computed once per file version instead of on every command.

Hashing a backbone's weights is what a cache key needs and what every ``unipt run/extract/train``
used to pay (about a second per 100 MB). A digest is now looked up, in this order:

1. a Hugging Face cache blob: a snapshot's file is a link to ``blobs/<sha256 of its content>`` for
   files stored with Git LFS (every ``*.safetensors``), so the name *is* the digest;
2. the digest memo, keyed by the file's real path, size, mtime, ctime and inode: any write to the file
   (even one that restores its mtime) changes ctime, so a stale digest is never reused;
3. hashing the file, and remembering the result in the memo.

The memo is one JSON file (``$UNIPT_DIGEST_MEMO``, default ``~/.cache/unipt/file_digests.json``),
rewritten atomically; losing or damaging it only costs a re-hash.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from pathlib import Path

from unipt.pipeline.hashing import sha256_file

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_LOCK = threading.Lock()
_MEMORY: dict[str, str] = {}


def memo_path() -> Path:
    return Path(os.environ.get("UNIPT_DIGEST_MEMO") or Path.home() / ".cache" / "unipt" / "file_digests.json")


def hub_blob_digest(path: Path) -> str | None:
    """The sha256 a Hugging Face cache names a file's blob by, when ``path`` is a link to one."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    if target.parent.name == "blobs" and _HEX64.match(target.name):
        return target.name
    return None


def _version(path: Path) -> str:
    stat = path.stat()  # of the real file (links followed)
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{stat.st_ino}"


def file_sha256(path: str | Path) -> str:
    """The file's sha256: a hub blob's name, a remembered digest of this very version, or a fresh hash."""
    path = Path(path)
    blob = hub_blob_digest(path)
    if blob is not None:
        return blob
    version = _version(path)
    with _LOCK:
        if version in _MEMORY:
            return _MEMORY[version]
        memo = _load()
        if version in memo:
            _MEMORY[version] = memo[version]
            return memo[version]
    digest = sha256_file(path)
    with _LOCK:
        _MEMORY[version] = digest
        memo = _load()
        memo[version] = digest
        _save(memo)
    return digest


def files_sha256(paths: list[Path]) -> str:
    """One digest over several files, as :func:`unipt.pipeline.hashing.sha256_files` computes it."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        digest.update(path.name.encode("utf-8"))
        digest.update(file_sha256(path).encode("ascii"))
    return digest.hexdigest()


def _load() -> dict[str, str]:
    try:
        memo = json.loads(memo_path().read_text())
    except (OSError, ValueError):
        return {}
    return (
        {k: v for k, v in memo.items() if isinstance(v, str) and _HEX64.match(v)}
        if isinstance(memo, dict)
        else {}
    )


def _save(memo: dict[str, str]) -> None:
    target = memo_path()
    # Entries of files that no longer exist are dropped, so the memo does not grow without bound.
    memo = {k: v for k, v in memo.items() if os.path.exists(k.split("|", 1)[0])}
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".digests-")
        with os.fdopen(fd, "w") as handle:
            json.dump(memo, handle, sort_keys=True)
        os.replace(tmp, target)  # readers see the old memo or the new one, never half of one
    except OSError:
        pass  # a read-only home: digests are simply recomputed next time
