"""Verified, resumable downloads from the Hugging Face Hub (or any Hub-compatible ``HF_ENDPOINT``).

Flow of ``download_model("org/repo@revision", precision="int8")``:

1. Offline check: nothing is sent when ``HF_HUB_OFFLINE`` is set (OfflineError). Nothing in
   ``model_store`` touches the network except this module, and only when a download is asked for.
2. ``HfApi().model_info(repo, revision, files_metadata=True)``: the revision (branch, tag or commit)
   is resolved once to a commit hash; every later request names that commit, so a branch moving
   during the download cannot mix two versions. The listing gives each file's size and hash (sha256
   for LFS files, the git blob sha1 for small files).
3. For a runtime bundle, ``bundle.json`` is fetched first and only the files of the chosen precision
   are planned (plus tokenizers, shared files); for a diffusers checkpoint every file but pickles.
4. Free disk space is checked against the bytes still to fetch (``shutil.disk_usage``).
5. Each file is fetched into ``<home>/staging/hub-<repo>-<commit>/<file>.part`` with
   ``huggingface_hub.file_download.http_get`` (it resumes mid-file itself a few times on a dropped
   connection); our own retry loop with exponential backoff resumes from the ``.part`` size with an
   HTTP Range request, across retries *and* across runs (huggingface_hub >= 1.x deletes partial files
   on failure, so we keep our own). Progress and cancel go through plain callables.
6. Each file's hash is checked against the Hub's and, for bundles, against ``bundle.json``; a file that
   does not match is deleted and the download fails. Only when every file matches is the staging
   folder renamed into ``<home>/models/<name>/`` and registered with the pinned commit. A failure at any
   step leaves the installed models and the registry untouched.

The access token is left to huggingface_hub (``HF_TOKEN`` or the token saved by ``hf auth login``);
it is never written to our files or logs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast
from urllib.parse import urlsplit

from model_store.bundle import (
    MANIFEST_NAME,
    BundleManifest,
    check_model_file,
    check_relative_path,
    is_pickle_name,
    list_files,
    manifest_from_json,
)
from model_store.errors import (
    BadRequestError,
    DownloadError,
    IntegrityError,
    InvalidModelError,
    NotEnoughSpaceError,
    OfflineError,
    RepoNotFoundError,
    RevisionNotFoundError,
    StoreCancelled,
    StoreError,
)
from model_store.registry import CHECKPOINT_INDEX, ModelSource, RegisteredModel, Registry, name_from

log = logging.getLogger(__name__)

_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_HASH_CHUNK = 1 << 20
PROGRESS_INTERVAL_S = 0.2
DEFAULT_RESERVE_BYTES = 16 * 1024 * 1024
SKIPPED_NAMES = (".gitattributes",)


@dataclass(frozen=True)
class DownloadProgress:
    """One progress report. Bytes count every planned file (already-present bytes included);
    ``bytes_per_s`` counts only bytes fetched in this run; ``eta_s`` is None until speed is known."""

    bytes_done: int
    bytes_total: int
    files_done: int
    files_total: int
    current_file: str
    bytes_per_s: float
    eta_s: float | None


ProgressCallback = Callable[[DownloadProgress], None]
CancelCheck = Callable[[], bool]


@dataclass(frozen=True)
class RemoteFile:
    """A file of the repo at the pinned commit: size, LFS sha256 (large files) or git blob sha1."""

    path: str
    size: int
    sha256: str | None = None
    blob_id: str | None = None


@dataclass(frozen=True)
class DownloadPlan:
    """What ``download_model`` will fetch: the repo at ``commit`` and the chosen files."""

    repo_id: str
    requested_revision: str | None
    commit: str
    kind: str
    precision: str | None
    files: tuple[RemoteFile, ...]
    manifest: BundleManifest | None = None
    skipped: tuple[str, ...] = field(default=())

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


# ----------------------------------------------------------------------------------------------
# entry points


def parse_repo_spec(spec: str) -> tuple[str, str | None]:
    """Split ``org/name@revision`` into ``("org/name", "revision")``; the revision is optional."""
    repo_id, _, revision = spec.partition("@")
    if not _REPO_RE.match(repo_id) or ".." in repo_id:
        raise BadRequestError(
            f"{spec!r} is not a Hub repo id",
            hint="write it as ORG/NAME or ORG/NAME@REVISION (branch, tag or commit)",
        )
    return repo_id, (revision or None)


def download_model(
    repo: str,
    *,
    revision: str | None = None,
    precision: str | None = None,
    name: str | None = None,
    registry: Registry | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    overwrite: bool = False,
    max_retries: int = 3,
    backoff_s: float = 1.0,
    reserve_bytes: int = DEFAULT_RESERVE_BYTES,
    endpoint: str | None = None,
    token: str | bool | None = None,
) -> RegisteredModel:
    """Download a Hub repo (``repo`` may be ``ORG/NAME@REV``), verify every file, install and register it.

    ``precision`` (fp32/fp16/int8) limits a bundle to that variant; None takes every file.
    ``name`` defaults to the bundle's name or the repo name. Raises OfflineError, RepoNotFoundError,
    RevisionNotFoundError, NotEnoughSpaceError, DownloadError (network; partial files kept for a
    resume), IntegrityError (hash mismatch; the bad file is deleted), StoreCancelled.
    """
    registry = registry if registry is not None else Registry()
    repo_id, spec_revision = parse_repo_spec(repo)
    revision = revision or spec_revision
    if name is not None and not overwrite:
        registry.ensure_name_free(name)  # fail before any network traffic
    plan = plan_download(
        repo_id, revision=revision, precision=precision, endpoint=endpoint, token=token, registry=registry
    )
    model_name = name or name_from(plan.manifest.name if plan.manifest is not None else repo_id)
    if not overwrite:
        registry.ensure_name_free(model_name)
    staging = _staging_dir(registry, repo_id, plan.commit)
    _check_free_space(plan, staging, reserve_bytes)
    fetch_files(
        plan,
        staging,
        endpoint=endpoint,
        token=token,
        progress=progress,
        cancel=cancel,
        max_retries=max_retries,
        backoff_s=backoff_s,
    )
    _drop_unplanned(plan, staging)
    source = ModelSource(
        type="hub",
        repo=repo_id,
        revision=plan.commit,
        request={"revision": plan.requested_revision, "precision": precision},
    )
    # every file was hashed against the Hub and bundle.json while downloading: no second pass
    model = registry.install(staging, model_name, source=source, move=True, overwrite=overwrite, verify=False)
    if precision is not None and plan.manifest is not None and precision not in model.variants:
        raise IntegrityError(f"the {precision} variant of {repo_id} is incomplete after download")
    return model


def plan_download(
    repo_id: str,
    *,
    revision: str | None = None,
    precision: str | None = None,
    endpoint: str | None = None,
    token: str | bool | None = None,
    registry: Registry | None = None,
) -> DownloadPlan:
    """Resolve the revision to a commit and list the files to fetch (network: model_info, bundle.json).

    With a ``registry``, ``bundle.json`` is kept in that registry's staging folder for the commit
    (where the download continues); without one it is fetched into a temporary folder.
    """
    ensure_online()
    from huggingface_hub import HfApi

    endpoint = _endpoint(endpoint)
    with _hub_errors(repo_id, revision, endpoint):
        info = HfApi(endpoint=endpoint, token=token).model_info(
            repo_id, revision=revision, files_metadata=True
        )
    commit = info.sha
    if not commit or not _COMMIT_RE.match(commit):
        raise DownloadError(f"{endpoint} did not return a commit hash for {repo_id}@{revision or 'main'}")
    if revision is not None and _COMMIT_RE.match(revision) and revision != commit:
        raise RevisionNotFoundError(f"{repo_id}: asked for commit {revision} but the Hub answered {commit}")
    remote = {s.rfilename: _remote_file(s) for s in (info.siblings or [])}
    for path in remote:
        check_relative_path(path, f"file listed by the Hub for {repo_id}")
    has_bundle, has_checkpoint = MANIFEST_NAME in remote, CHECKPOINT_INDEX in remote
    if not (has_bundle or has_checkpoint):
        raise InvalidModelError(
            f"{repo_id}@{commit[:12]} holds neither {MANIFEST_NAME} (runtime bundle) nor {CHECKPOINT_INDEX} (checkpoint)",
            hint="check the repo id; SnapGen Studio downloads bundles and diffusers-layout checkpoints",
        )
    manifest = None
    if has_bundle:
        staging = _staging_dir(registry, repo_id, commit) if registry is not None else None
        manifest = _fetch_manifest(repo_id, commit, remote[MANIFEST_NAME], staging, endpoint, token)
    wanted, skipped, kind = _choose_files(remote, manifest, precision, has_checkpoint)
    missing = [p for p in wanted if p not in remote]
    if missing:
        raise IntegrityError(
            f"{repo_id}@{commit[:12]}: bundle.json lists {missing} but the repo does not have them",
            hint="the repo is incomplete; ask its owner or pick another precision",
            files=tuple(missing),
        )
    files = tuple(remote[p] for p in wanted)
    if manifest is not None:
        _check_hub_against_manifest(files, manifest)
    return DownloadPlan(repo_id, revision, commit, kind, precision, files, manifest, tuple(skipped))


def fetch_files(
    plan: DownloadPlan,
    staging: Path,
    *,
    endpoint: str | None = None,
    token: str | bool | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    max_retries: int = 3,
    backoff_s: float = 1.0,
) -> None:
    """Fetch every planned file into ``staging`` (resuming ``.part`` files) and verify its hashes."""
    endpoint = _endpoint(endpoint)
    tracker = _Tracker(plan, staging, progress)
    for remote in plan.files:
        final = staging / remote.path
        if (
            final.is_file()
            and final.stat().st_size == remote.size
            and _hashes_match(final, remote, plan.manifest)
        ):
            tracker.file_done(remote.path)
            continue
        final.unlink(missing_ok=True)
        _fetch_with_retries(plan, remote, staging, endpoint, token, tracker, cancel, max_retries, backoff_s)
        part = _part_path(final)
        try:
            _verify_download(part, remote, plan.manifest)
            check_model_file(part, name=remote.path)
        except StoreError:
            part.unlink(missing_ok=True)  # a wrong file must be fetched again from scratch
            raise
        os.replace(part, final)
        tracker.file_done(remote.path)


def ensure_online() -> None:
    """Raise OfflineError when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    if any(flag.strip().lower() in ("1", "true", "yes", "on") for flag in flags):
        raise OfflineError(
            "downloads are disabled: HF_HUB_OFFLINE is set",
            hint="unset HF_HUB_OFFLINE to download; installed models keep working offline",
        )


# ----------------------------------------------------------------------------------------------
# planning helpers


def _endpoint(endpoint: str | None) -> str:
    # read HF_ENDPOINT at call time: huggingface_hub.constants reads it once at import
    if endpoint:
        return endpoint.rstrip("/")
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _staging_dir(registry: Registry, repo_id: str, commit: str) -> Path:
    """Deterministic per repo+commit, so a later run finds the partial files and resumes them."""
    folder = registry.staging_dir / f"hub-{repo_id.replace('/', '--')}-{commit[:16]}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _remote_file(sibling: Any) -> RemoteFile:
    lfs = sibling.lfs
    if lfs is not None:
        return RemoteFile(sibling.rfilename, int(lfs.size), sha256=str(lfs.sha256).lower())
    return RemoteFile(sibling.rfilename, int(sibling.size or 0), blob_id=sibling.blob_id)


def _choose_files(
    remote: dict[str, RemoteFile],
    manifest: BundleManifest | None,
    precision: str | None,
    has_checkpoint: bool,
) -> tuple[list[str], list[str], str]:
    """(files to fetch, files skipped, kind). A precision restricts to the bundle's variant files."""
    if manifest is not None:
        if precision is not None:
            manifest.variant(precision)  # raises, naming the available precisions
        bundle_files = [MANIFEST_NAME, *manifest.files_for(None if precision is None else [precision])]
        if precision is not None or not has_checkpoint:
            return bundle_files, [], "bundle"
    elif precision is not None:
        raise InvalidModelError(
            "this repo holds a training checkpoint, not a runtime bundle; --precision applies to bundles only",
            hint="download without --precision, then export it with `snapgen export`",
        )
    skipped = sorted(p for p in remote if is_pickle_name(p) or p in SKIPPED_NAMES)
    wanted = sorted(p for p in remote if p not in skipped)
    if skipped:
        log.info("not downloading %s (pickles are refused)", skipped)
    return wanted, skipped, "both" if manifest is not None else "checkpoint"


def _check_hub_against_manifest(files: tuple[RemoteFile, ...], manifest: BundleManifest) -> None:
    """The Hub's LFS sha256/size of each bundle file must equal bundle.json's (before fetching anything)."""
    bad = []
    for remote in files:
        entry = manifest.files.get(remote.path)
        if entry is None:
            continue
        if remote.size != entry.size or (remote.sha256 is not None and remote.sha256 != entry.sha256):
            bad.append(remote.path)
    if bad:
        raise IntegrityError(
            f"the Hub's hashes of {bad} differ from bundle.json",
            hint="the repo's bundle.json is stale; ask its owner to re-export",
            files=tuple(bad),
        )


def _fetch_manifest(
    repo_id: str,
    commit: str,
    remote: RemoteFile,
    staging: Path | None,
    endpoint: str,
    token: str | bool | None,
) -> BundleManifest:
    folder = staging
    if folder is None:
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="snapgen-manifest-"))
    path = folder / MANIFEST_NAME
    if not (path.is_file() and _hashes_match(path, remote, None)):
        path.unlink(missing_ok=True)
        plan = DownloadPlan(repo_id, None, commit, "bundle", None, (remote,))
        _fetch_with_retries(plan, remote, folder, endpoint, token, _Tracker(plan, folder, None), None, 2, 0.5)
        part = _part_path(path)
        try:
            _verify_download(part, remote, None)
        except StoreError:
            part.unlink(missing_ok=True)
            raise
        os.replace(part, path)
    try:
        return manifest_from_json(path.read_text(encoding="utf-8"))
    finally:
        if staging is None:
            shutil.rmtree(folder, ignore_errors=True)


def _check_free_space(plan: DownloadPlan, staging: Path, reserve_bytes: int) -> None:
    have = 0
    for remote in plan.files:
        for candidate in (staging / remote.path, _part_path(staging / remote.path)):
            with contextlib.suppress(OSError):
                have += min(candidate.stat().st_size, remote.size)
    needed = max(plan.total_bytes - have, 0)
    free = shutil.disk_usage(staging).free
    if needed + reserve_bytes > free:
        raise NotEnoughSpaceError(
            f"{plan.repo_id} needs {_mb(needed)} more but {staging.parent} has only {_mb(free)} free",
            hint="free some disk space or point SNAPGEN_HOME at a larger disk",
        )


def _drop_unplanned(plan: DownloadPlan, staging: Path) -> None:
    """Remove leftovers of an earlier attempt with another precision (stray .part files included)."""
    planned = {f.path for f in plan.files}
    for name in list_files(staging):
        if name not in planned:
            (staging / name).unlink(missing_ok=True)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


# ----------------------------------------------------------------------------------------------
# transfer


def _part_path(final: Path) -> Path:
    return final.with_name(final.name + ".part")


def _transport_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module_name in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            module = __import__(module_name)
            errors.append(module.TransportError)
    with contextlib.suppress(ImportError):
        import requests

        errors.append(requests.ConnectionError)
    return tuple(errors)


def _fetch_with_retries(
    plan: DownloadPlan,
    remote: RemoteFile,
    staging: Path,
    endpoint: str,
    token: str | bool | None,
    tracker: _Tracker,
    cancel: CancelCheck | None,
    max_retries: int,
    backoff_s: float,
) -> None:
    from huggingface_hub.errors import HfHubHTTPError

    transient = (*_transport_errors(), HfHubHTTPError, OSError)
    for attempt in range(max_retries + 1):
        try:
            _fetch_once(plan, remote, staging, endpoint, token, tracker, cancel)
            return
        except (StoreError, KeyboardInterrupt):
            raise
        except transient as exc:
            if isinstance(exc, HfHubHTTPError) and not _retryable_status(exc):
                raise _map_hub_error(exc, plan.repo_id, plan.commit, endpoint) from exc
            if attempt >= max_retries:
                kept = _part_path(staging / remote.path)
                raise DownloadError(
                    f"downloading {remote.path} from {plan.repo_id} failed after {max_retries + 1} attempts: "
                    f"{_short(exc)}",
                    hint=f"check your connection and run the download again; it resumes from {_mb(_size(kept))}",
                ) from exc
            delay = backoff_s * (2**attempt)
            log.warning("%s: %s; retrying in %.1f s", remote.path, _short(exc), delay)
            time.sleep(delay)


def _retryable_status(exc: Any) -> bool:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status is None or status in (408, 429) or status >= 500


def _fetch_once(
    plan: DownloadPlan,
    remote: RemoteFile,
    staging: Path,
    endpoint: str,
    token: str | bool | None,
    tracker: _Tracker,
    cancel: CancelCheck | None,
) -> None:
    """One attempt: HEAD for the location, then a (ranged) GET appending to ``<file>.part``."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(plan.repo_id, remote.path, revision=plan.commit, endpoint=endpoint)
    meta = get_hf_file_metadata(url, token=token, endpoint=endpoint)
    if meta.commit_hash and meta.commit_hash != plan.commit:
        raise IntegrityError(
            f"{remote.path}: the Hub served commit {meta.commit_hash}, not the pinned {plan.commit}"
        )
    if (
        remote.sha256 is not None
        and meta.etag
        and re.fullmatch(r"[0-9a-f]{64}", meta.etag)
        and meta.etag != remote.sha256
    ):
        raise IntegrityError(
            f"{remote.path}: the Hub's ETag {meta.etag} differs from its listed sha256 {remote.sha256}"
        )
    headers = build_hf_headers(token=token)
    location = meta.location or url
    if urlsplit(location).netloc != urlsplit(url).netloc:
        headers.pop("authorization", None)  # never send the token to a CDN
    part = _part_path(staging / remote.path)
    part.parent.mkdir(parents=True, exist_ok=True)
    resume = _size(part)
    if resume > remote.size:
        part.unlink()
        resume = 0
    tracker.start_file(remote.path, resume)
    with open(part, "r+b" if part.exists() else "wb") as raw:
        raw.seek(0, os.SEEK_END)
        http_get(
            location,
            cast(BinaryIO, _ReportingFile(raw, tracker, cancel)),
            resume_size=resume,
            headers=headers,
            expected_size=remote.size,
            tqdm_class=_QuietBar,  # type: ignore[arg-type]
        )


class _ReportingFile:
    """File wrapper handed to ``http_get``: counts bytes for progress and raises on cancel."""

    def __init__(self, raw: BinaryIO, tracker: _Tracker, cancel: CancelCheck | None) -> None:
        self._raw = raw
        self._tracker = tracker
        self._cancel = cancel

    def write(self, chunk: bytes) -> int:
        if self._cancel is not None and self._cancel():
            raise StoreCancelled("download cancelled; run it again to resume")
        written = self._raw.write(chunk)
        self._tracker.add(len(chunk))
        return written

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def truncate(self, size: int | None = None) -> int:
        # The server ignored our Range header and sends the whole file: http_get has seeked back to
        # where this file started and cuts it there (``size`` None: at the current position).
        keep = self._raw.tell() if size is None else size
        before = self._raw.seek(0, os.SEEK_END)
        self._raw.seek(keep)
        after = self._raw.truncate(keep)
        self._tracker.add(after - before)
        return after

    def flush(self) -> None:
        self._raw.flush()


class _QuietBar:
    """A do-nothing progress bar so huggingface_hub prints nothing; we report through callables."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> _QuietBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: float | None = 1) -> None:
        return None

    def close(self) -> None:
        return None


class _Tracker:
    """Aggregates bytes across files and calls the progress callable at most every 0.2 s."""

    def __init__(self, plan: DownloadPlan, staging: Path, callback: ProgressCallback | None) -> None:
        self.callback = callback
        self.total = plan.total_bytes
        self.files_total = len(plan.files)
        self.files_done = 0
        self.done_before_file = 0  # bytes of finished files
        self.file_bytes = 0  # bytes of the current file (resumed bytes included)
        self.fetched = 0  # bytes received in this run (for speed)
        self.current = ""
        self.sizes = {f.path: f.size for f in plan.files}
        self.started = time.monotonic()
        self.last_emit = 0.0

    def start_file(self, path: str, resumed: int) -> None:
        self.current = path
        self.file_bytes = resumed
        self._emit(force=True)

    def add(self, n: int) -> None:
        self.file_bytes += n
        self.fetched += max(n, 0)
        self._emit()

    def file_done(self, path: str) -> None:
        self.done_before_file += self.sizes.get(path, 0)
        self.file_bytes = 0
        self.files_done += 1
        self.current = path
        self._emit(force=True)

    def _emit(self, force: bool = False) -> None:
        if self.callback is None:
            return
        now = time.monotonic()
        if not force and now - self.last_emit < PROGRESS_INTERVAL_S:
            return
        self.last_emit = now
        done = min(self.done_before_file + self.file_bytes, self.total)
        elapsed = max(now - self.started, 1e-6)
        speed = self.fetched / elapsed
        eta = (self.total - done) / speed if speed > 0 else None
        self.callback(
            DownloadProgress(done, self.total, self.files_done, self.files_total, self.current, speed, eta)
        )


# ----------------------------------------------------------------------------------------------
# verification and errors


def _hashes(path: Path) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file in one pass."""
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1()
    sha1.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            sha256.update(chunk)
            sha1.update(chunk)
    return sha256.hexdigest(), sha1.hexdigest()


def _hash_problem(path: Path, remote: RemoteFile, manifest: BundleManifest | None) -> str | None:
    size = _size(path)
    if size != remote.size:
        return f"size {size} != expected {remote.size}"
    sha256, sha1 = _hashes(path)
    if remote.sha256 is not None and sha256 != remote.sha256:
        return f"sha256 {sha256} != Hub's {remote.sha256}"
    if remote.sha256 is None and remote.blob_id is not None and sha1 != remote.blob_id:
        return f"git blob id {sha1} != Hub's {remote.blob_id}"
    if remote.sha256 is None and remote.blob_id is None:
        return "the Hub listed no hash for it"
    entry = manifest.files.get(remote.path) if manifest is not None else None
    if entry is not None and sha256 != entry.sha256:
        return f"sha256 {sha256} != bundle.json's {entry.sha256}"
    return None


def _hashes_match(path: Path, remote: RemoteFile, manifest: BundleManifest | None) -> bool:
    return _hash_problem(path, remote, manifest) is None


def _verify_download(part: Path, remote: RemoteFile, manifest: BundleManifest | None) -> None:
    problem = _hash_problem(part, remote, manifest)
    if problem is not None:
        raise IntegrityError(
            f"{remote.path} failed verification: {problem}",
            hint="the file was deleted; run the download again (if it keeps failing the repo is corrupt)",
            files=(remote.path,),
        )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str | None, endpoint: str) -> Iterator[None]:
    """Map huggingface_hub/httpx errors of the listing call to our errors with a hint."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        yield
    except OfflineModeIsEnabled as exc:
        raise OfflineError(
            "downloads are disabled: HF_HUB_OFFLINE is set", hint="unset HF_HUB_OFFLINE to download"
        ) from exc
    except HfHubHTTPError as exc:
        raise _map_hub_error(exc, repo_id, revision, endpoint) from exc
    except _transport_errors() as exc:
        raise DownloadError(
            f"cannot reach {endpoint} to look up {repo_id}: {_short(exc)}",
            hint="check your connection (or HF_ENDPOINT); installed models keep working offline",
        ) from exc


def _map_hub_error(exc: BaseException, repo_id: str, revision: str | None, endpoint: str) -> StoreError:
    from huggingface_hub.errors import RepositoryNotFoundError
    from huggingface_hub.errors import RevisionNotFoundError as HubRevisionNotFound

    if isinstance(exc, HubRevisionNotFound):
        return RevisionNotFoundError(
            f"{repo_id} has no revision {revision!r}",
            hint="give an existing branch, tag or commit hash after '@'",
        )
    if isinstance(exc, RepositoryNotFoundError):
        return RepoNotFoundError(
            f"repository {repo_id!r} was not found on {endpoint}",
            hint="check the spelling; for a private or gated repo set HF_TOKEN or run `hf auth login`",
        )
    status = getattr(getattr(exc, "response", None), "status_code", "?")
    return DownloadError(
        f"{endpoint} answered HTTP {status} for {repo_id}: {_short(exc)}", hint="try again later"
    )
