"""Segment checkpoints: data objects first, ``manifest.json`` last, verified on read.

Layout (one attempt directory per render, so a re-render never touches earlier objects)::

    jobs/<job>/segments/<index:05d>/<render_id>/video.mp4
    jobs/<job>/segments/<index:05d>/<render_id>/motion.safetensors
    jobs/<job>/segments/<index:05d>/<render_id>/manifest.json   <- written last

The manifest holds the sha256 and size of every data object plus the caller's metadata
(frame and sample ranges, seed, weights hash, parameters, previous segment's manifest hash).
A segment is done when some attempt's manifest exists and every object it names verifies;
otherwise it reads as absent. Writing over a segment that already verifies is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from emo.errors import CheckpointExists, ObjectNotFound, StoreError
from emo.store.base import ObjectStore, sha256_stream

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SegmentCheckpoint:
    """A verified checkpoint: where it lives, its manifest and the manifest's sha256."""

    job_id: str
    index: int
    prefix: str  # jobs/<job>/segments/<index>/<render_id>/
    manifest: dict[str, Any]
    manifest_sha256: str

    def key(self, name: str) -> str:
        """The object key of the data file ``name`` (e.g. ``video.mp4``)."""
        return self.manifest["files"][name]["key"]


def segment_prefix(job_id: str, index: int) -> str:
    """Key prefix of every attempt of one segment."""
    return f"jobs/{job_id}/segments/{index:05d}/"


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as stream:
        return sha256_stream(stream)


def _render_id() -> str:
    """Sortable by time, unique across concurrent writers."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:8]}"


def verify_manifest(store: ObjectStore, manifest_key: str) -> SegmentCheckpoint | None:
    """The checkpoint whose manifest is at ``manifest_key``, or None unless it all verifies."""
    try:
        raw = store.get_bytes(manifest_key)
        manifest = json.loads(raw)
        files = manifest["files"]
        prefix = manifest_key[: -len(MANIFEST)]
        for name, entry in files.items():
            key = entry["key"]
            if not key.startswith(prefix):
                log.warning("checkpoint %s: %s lies outside its attempt", manifest_key, name)
                return None
            if store.stat(key).size != entry["size"] or store.sha256(key) != entry["sha256"]:
                log.warning("checkpoint %s: %s does not match its hash", manifest_key, name)
                return None
        return SegmentCheckpoint(
            job_id=manifest["job_id"],
            index=int(manifest["index"]),
            prefix=prefix,
            manifest=manifest,
            manifest_sha256=hashlib.sha256(raw).hexdigest(),
        )
    except ObjectNotFound:
        log.warning("checkpoint %s: an object it names is missing", manifest_key)
        return None
    except (ValueError, KeyError, TypeError, AttributeError):
        log.warning("checkpoint %s: manifest is not valid", manifest_key)
        return None


def read_segment_checkpoint(
    store: ObjectStore, *, job_id: str, index: int
) -> SegmentCheckpoint | None:
    """The segment's verified checkpoint (the oldest attempt that verifies), or None."""
    manifests = [
        info.key
        for info in store.list(segment_prefix(job_id, index))
        if info.key.endswith("/" + MANIFEST)
    ]
    for key in sorted(manifests):
        checkpoint = verify_manifest(store, key)
        if checkpoint is not None:
            return checkpoint
    return None


def write_segment_checkpoint(
    store: ObjectStore,
    *,
    job_id: str,
    index: int,
    files: Mapping[str, Path],
    meta: Mapping[str, Any],
) -> SegmentCheckpoint:
    """Upload ``files`` (name -> local path), then the manifest; return the new checkpoint.

    Raises ``CheckpointExists`` if the segment already has a verified checkpoint: a verified
    checkpoint is never modified or shadowed.
    """
    if read_segment_checkpoint(store, job_id=job_id, index=index) is not None:
        raise CheckpointExists(
            f"segment {index} of job {job_id} already has a verified "
            "checkpoint; it is never rewritten"
        )
    prefix = f"{segment_prefix(job_id, index)}{_render_id()}/"
    entries = {}
    for name, path in files.items():
        if "/" in name or name == MANIFEST:
            raise StoreError(f"invalid checkpoint file name {name!r}")
        digest = _file_sha256(path)
        info = store.put_file(prefix + name, path)
        entries[name] = {"key": prefix + name, "sha256": digest, "size": info.size}
    manifest = {
        **meta,
        "format": FORMAT_VERSION,
        "job_id": job_id,
        "index": index,
        "created_at": datetime.now(UTC).isoformat(),
        "files": entries,
    }
    raw = json.dumps(manifest, indent=2, sort_keys=True).encode()
    store.put_bytes(prefix + MANIFEST, raw)
    return SegmentCheckpoint(
        job_id=job_id,
        index=index,
        prefix=prefix,
        manifest=manifest,
        manifest_sha256=hashlib.sha256(raw).hexdigest(),
    )
