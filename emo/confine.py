"""Where a manifest's inputs may be read from.

A manifest names its portrait and vocal track as paths relative to itself, absolute paths,
``file://`` or ``s3://`` URIs, and whichever host runs the submit reads them with its own
rights: an absolute path reads that host's files (a nightly run reads its pod's), an ``s3://``
URI any bucket the workers' keys can read. So:

- ``EMO_INPUT_ROOTS`` (folders, ``:``-separated) and ``EMO_INPUT_BUCKETS`` (``,``-separated)
  say where absolute inputs may come from; unset means anywhere (a user's own machine), empty
  means nowhere.
- A manifest from the inbox (``inbox=True``) may name only files beside it (relative, never
  climbing out with ``..``), plus what those two settings allow explicitly.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

from emo.settings import Settings


def _listed(value: str | None, separator: str) -> list[str] | None:
    if value is None:
        return None
    return [item.strip() for item in value.split(separator) if item.strip()]


def _within(path: Path, roots: list[str]) -> bool:
    real = Path(os.path.realpath(path))  # a symlink is judged by where it leads
    return any(real.is_relative_to(os.path.realpath(root)) for root in roots)


def input_problem(
    uri: str, *, settings: Settings, inbox: bool, resolved: str | None = None
) -> str | None:
    """Why ``uri`` (as the manifest wrote it) may not be read here, or None. A relative input
    is also judged where it ``resolved`` to (against the manifest's folder, or a ``base`` the
    submitter gave) by the settings' roots and buckets."""
    parsed = urlparse(uri)
    is_local = parsed.scheme in ("", "file") or len(parsed.scheme) == 1
    relative = parsed.scheme == "" and not Path(uri).is_absolute()
    if relative:
        if inbox and ".." in PurePosixPath(unquote(uri).replace("\\", "/")).parts:
            return f"{uri!r} climbs out of the manifest's folder ('..'); name a file beside it"
        if resolved is None or resolved == uri:
            return None
        problem = input_problem(resolved, settings=settings, inbox=False)
        if problem is None:
            return None
        return f"{uri!r} resolves to a place inputs may not come from: {problem}"
    if parsed.scheme == "s3":
        buckets = _listed(settings.input_buckets, ",")
        if buckets is None and not inbox:
            return None
        if buckets and parsed.netloc in buckets:
            return None
        allowed = ", ".join(buckets) if buckets else "none"
        return (
            f"{uri!r} is in bucket {parsed.netloc!r}, which inputs may not come from (allowed: "
            f"{allowed}; EMO_INPUT_BUCKETS); put it beside the manifest"
        )
    if is_local:
        roots = _listed(settings.input_roots, ":")
        if roots is None and not inbox:
            return None
        path = Path(unquote(parsed.path)) if parsed.scheme == "file" else Path(uri)
        if roots and _within(path, roots):
            return None
        allowed = ", ".join(roots) if roots else "none"
        return (
            f"{uri!r} is outside the folders inputs may come from (allowed: {allowed}; "
            "EMO_INPUT_ROOTS); put it beside the manifest"
        )
    return None  # an unsupported scheme: fetching it reports that
