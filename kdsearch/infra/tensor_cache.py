"""Content-addressed on-disk store for expensive tensors (decoded datasets, IG maps, teacher logits).

An artefact lives in ``<root>/<kind>/<key>/`` as ``tensors.pt`` plus ``meta.json``; the key is a hash
of everything the content depends on. ``meta.json`` is written last and records the tensors file's
size and sha256, so a crash mid-write or a later truncation is detected and the artefact rebuilt.
Builds run under a file lock, so concurrent processes (study workers) compute an artefact once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

log = logging.getLogger(__name__)

TENSORS = "tensors.pt"
META = "meta.json"


def content_key(fields: dict[str, Any]) -> str:
    canonical = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


@dataclass
class Artifact:
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    path: Path


class TensorCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def directory(self, kind: str, fields: dict[str, Any]) -> Path:
        return self.root / kind / content_key(fields)

    def load(self, kind: str, fields: dict[str, Any]) -> Artifact | None:
        """The stored artefact, or None when it is missing, truncated or corrupt."""
        directory = self.directory(kind, fields)
        meta_path, tensors_path = directory / META, directory / TENSORS
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            intact = (
                tensors_path.stat().st_size == meta["file_bytes"] and file_sha256(tensors_path) == meta["file_sha256"]
            )
            if intact:
                tensors = torch.load(tensors_path, map_location="cpu", mmap=True, weights_only=True)
                return Artifact(tensors=tensors, meta=meta, path=directory)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            log.warning("cache %s is unreadable (%s); rebuilding", directory, error)
            return None
        log.warning("cache %s is truncated or corrupt; rebuilding", directory)
        return None

    def get_or_build(
        self,
        kind: str,
        fields: dict[str, Any],
        build: Callable[[Path], tuple[dict[str, torch.Tensor], dict[str, Any]]],
    ) -> Artifact:
        """Load the artefact, or build it once under a lock.

        ``build(scratch_dir)`` returns (tensors, extra metadata). ``scratch_dir`` survives a crash, so a
        builder can keep resumable partial results there; it is removed after a successful write.
        """
        artifact = self.load(kind, fields)
        if artifact is not None:
            return artifact
        directory = self.directory(kind, fields)
        directory.mkdir(parents=True, exist_ok=True)
        with FileLock(str(directory) + ".lock"):
            artifact = self.load(kind, fields)  # another process may have built it while we waited
            if artifact is not None:
                return artifact
            (directory / META).unlink(missing_ok=True)
            scratch = directory / "partial"
            scratch.mkdir(exist_ok=True)
            tensors, extra = build(scratch)
            self._write(directory, fields, tensors, extra)
            shutil.rmtree(scratch, ignore_errors=True)
        artifact = self.load(kind, fields)
        if artifact is None:
            raise OSError(f"cache {directory} could not be read back after writing it")
        return artifact

    @staticmethod
    def _write(directory: Path, fields: dict[str, Any], tensors: dict[str, torch.Tensor], extra: dict) -> None:
        tensors_tmp, meta_tmp = directory / (TENSORS + ".tmp"), directory / (META + ".tmp")
        torch.save({name: tensor.contiguous() for name, tensor in tensors.items()}, tensors_tmp)
        _fsync(tensors_tmp)
        os.replace(tensors_tmp, directory / TENSORS)
        meta = {
            "key_fields": fields,
            "file_bytes": (directory / TENSORS).stat().st_size,
            "file_sha256": file_sha256(directory / TENSORS),
            "shapes": {name: list(tensor.shape) for name, tensor in tensors.items()},
            **extra,
        }
        meta_tmp.write_text(json.dumps(meta, indent=2, default=str))
        _fsync(meta_tmp)
        os.replace(meta_tmp, directory / META)  # the commit point: a reader sees all of it or none


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
