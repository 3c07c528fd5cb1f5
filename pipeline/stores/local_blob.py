"""The default blob store: a folder. Writes are atomic (temp file + rename)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path, PurePosixPath

from pipeline.errors import InvalidRequest


class LocalBlobStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        parts = PurePosixPath(key).parts
        if not key or key.startswith("/") or any(p in ("..", ".", "") for p in parts) or "\\" in key:
            raise InvalidRequest(f"invalid blob key {key!r}")
        return self.root.joinpath(*parts)

    def get(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def keys_under(self, prefix: str) -> list[str]:
        if not prefix.endswith("/"):
            raise InvalidRequest(f"not a folder: {prefix!r}")
        folder = self._path(prefix.rstrip("/"))
        # a writer's temp file is no key (it becomes one by its rename)
        return [f"{prefix}{p.relative_to(folder).as_posix()}" for p in folder.rglob("*")
                if p.is_file() and not p.name.startswith(".tmp-")]
