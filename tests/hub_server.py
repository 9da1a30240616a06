"""Test helpers: tiny bundles/checkpoints built on disk, and a local fake Hugging Face Hub server
(``FakeHub``) on 127.0.0.1, shared by every tests/test_model_store_*.py file."""

from __future__ import annotations

import hashlib
import json
import random
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from model_store.bundle import (
    BundleManifest,
    Defaults,
    ModelSpec,
    TextEncoderSpec,
    Variant,
    write_manifest,
)


def fake_onnx_bytes(seed: int, size: int = 2048) -> bytes:
    """Bytes that pass check_onnx_file (tag 0x08, ir_version 8) followed by seeded noise."""
    rng = random.Random(seed)
    return b"\x08\x08" + bytes(rng.getrandbits(8) for _ in range(size - 2))


def make_manifest(name: str, precisions: tuple[str, ...] = ("fp32", "int8")) -> BundleManifest:
    """A manifest (files still empty) naming unet/decoder per precision, one text encoder."""
    return BundleManifest(
        name=name,
        model=ModelSpec(
            unet={"block_out_channels": [8, 16]},
            decoder={"channels": 8},
            text_encoders=(
                TextEncoderSpec(
                    file="text_encoder.onnx",
                    tokenizer="tokenizer.json",
                    max_length=16,
                    pad_to_max_length=True,
                    hidden_size=32,
                    pooled_size=32,
                ),
            ),
            latent_channels=16,
            vae_scale_factor=8,
        ),
        defaults=Defaults(steps=4, width=64, height=64, shift=3.0, guidance_scale=1.0),
        variants={
            p: Variant(
                unet=f"unet.{p}.onnx",
                decoder=f"decoder.{p}.onnx",
                text_encoder=("text_encoder.onnx",),
                parity={"metric": "psnr", "value": 40.0, "threshold": 30.0},
            )
            for p in precisions
        },
        license="apache-2.0",
    )


def make_bundle(
    folder: Path, name: str = "tiny", precisions: tuple[str, ...] = ("fp32", "int8"), size: int = 2048
) -> BundleManifest:
    """Write a tiny (fake-weights) bundle into ``folder`` and its bundle.json; return the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}}), encoding="utf-8")
    (folder / "text_encoder.onnx").write_bytes(fake_onnx_bytes(1, size))
    for i, precision in enumerate(precisions):
        (folder / f"unet.{precision}.onnx").write_bytes(fake_onnx_bytes(10 + i, size))
        (folder / f"decoder.{precision}.onnx").write_bytes(fake_onnx_bytes(20 + i, size))
    return write_manifest(folder, make_manifest(name, precisions))


def safetensors_bytes(n_floats: int = 8) -> bytes:
    """A valid safetensors file with one float32 tensor ``w`` of ``n_floats`` values."""
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [n_floats], "data_offsets": [0, 4 * n_floats]}}
    ).encode()
    return struct.pack("<Q", len(header)) + header + struct.pack(f"<{n_floats}f", *range(n_floats))


def make_checkpoint(folder: Path) -> None:
    """A tiny diffusers-layout checkpoint: model_index.json + unet/{config.json, *.safetensors}."""
    (folder / "unet").mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "SnapGenPipeline"}), encoding="utf-8")
    (folder / "unet" / "config.json").write_text(json.dumps({"sample_size": 8}), encoding="utf-8")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(safetensors_bytes())


# ----------------------------------------------------------------------------------------------
# a fake Hugging Face Hub on 127.0.0.1


LFS_SUFFIXES = (".onnx", ".safetensors")


@dataclass
class FakeRepo:
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> commit
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> {path: bytes}


class FakeHub:
    """The endpoints huggingface_hub uses to list and download a model repo, served from memory.

    * ``GET /api/models/{repo}[/revision/{rev}]`` -> ``{"id", "sha", "siblings": [{rfilename, size,
      blobId, lfs: {size, sha256, pointerSize}}]}`` (404 with ``X-Error-Code: RepoNotFound`` /
      ``RevisionNotFound``, as the real Hub answers).
    * ``HEAD/GET /{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag`` (git blob sha1) or, for
      LFS files (.onnx/.safetensors), ``X-Linked-Etag`` (sha256) + ``X-Linked-Size``; ``Range: bytes=N-``
      answered with 206 + ``Content-Range``.

    Faults for tests: ``drop[path] = [bytes_to_send, times]`` cuts the connection mid-body;
    ``fail[path] = status`` answers GETs with that status; ``corrupt[path] = bytes`` serves other
    bytes (same size) than the ones listed; ``ignore_range`` answers every GET with 200 and the
    whole file, as some mirrors and CDNs do. ``requests`` logs (method, path, Range header).
    """

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.drop: dict[str, list[int]] = {}
        self.fail: dict[str, int] = {}
        self.corrupt: dict[str, bytes] = {}
        self.ignore_range = False
        self.requests: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # quiet
                return None

            def do_GET(self) -> None:
                hub._handle(self, head=False)

            def do_HEAD(self) -> None:
                hub._handle(self, head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- repo building ---------------------------------------------------------------------------

    def add_commit(
        self, repo_id: str, files: dict[str, bytes], *, branch: str = "main", tag: str | None = None
    ) -> str:
        """Make a commit with exactly ``files`` and point ``branch`` (and ``tag``) at it; return its hash."""
        repo = self.repos.setdefault(repo_id, FakeRepo())
        digest = hashlib.sha1(
            repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode()
        )
        commit = digest.hexdigest()
        repo.commits[commit] = dict(files)
        repo.refs[branch] = commit
        if tag:
            repo.refs[tag] = commit
        return commit

    def add_folder(self, repo_id: str, folder: Path, **kwargs: str) -> str:
        files = {
            p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
        }
        return self.add_commit(repo_id, files, **kwargs)

    def paths_requested(self, method: str = "GET") -> list[str]:
        return [p for m, p, _ in self.requests if m == method]

    # -- serving ---------------------------------------------------------------------------------

    def _resolve(self, repo_id: str, rev: str) -> str | None:
        repo = self.repos[repo_id]
        if rev in repo.commits:
            return rev
        return repo.refs.get(rev)

    def _handle(self, req: BaseHTTPRequestHandler, *, head: bool) -> None:
        path = unquote(urlsplit(req.path).path)
        with self._lock:
            self.requests.append(("HEAD" if head else "GET", path, req.headers.get("Range")))
        if path.startswith("/api/models/"):
            self._model_info(req, path[len("/api/models/") :])
        elif "/resolve/" in path:
            self._resolve_file(req, path.lstrip("/"), head=head)
        else:
            self._error(req, 404, None)

    def _error(
        self, req: BaseHTTPRequestHandler, status: int, code: str | None, commit: str | None = None
    ) -> None:
        body = json.dumps({"error": code or "not found"}).encode()
        req.send_response(status)
        if code:
            req.send_header("X-Error-Code", code)
            req.send_header("X-Error-Message", code)
        if commit:
            req.send_header("X-Repo-Commit", commit)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        if req.command != "HEAD":
            req.wfile.write(body)

    def _model_info(self, req: BaseHTTPRequestHandler, rest: str) -> None:
        repo_id, _, rev = rest.partition("/revision/")
        rev = rev or "main"
        if repo_id not in self.repos:
            return self._error(req, 404, "RepoNotFound")
        commit = self._resolve(repo_id, rev)
        if commit is None:
            return self._error(req, 404, "RevisionNotFound")
        siblings = []
        for name, data in sorted(self.repos[repo_id].commits[commit].items()):
            entry: dict[str, object] = {"rfilename": name, "size": len(data), "blobId": _git_blob_id(data)}
            if name.endswith(LFS_SUFFIXES):
                entry["lfs"] = {
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "pointerSize": 130,
                }
            siblings.append(entry)
        body = json.dumps({"id": repo_id, "modelId": repo_id, "sha": commit, "siblings": siblings}).encode()
        req.send_response(200)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)

    def _resolve_file(self, req: BaseHTTPRequestHandler, path: str, *, head: bool) -> None:
        # {org}/{name}/resolve/{rev}/{file...}
        repo_id, _, rest = path.partition("/resolve/")
        rev, _, name = rest.partition("/")
        if repo_id not in self.repos:
            return self._error(req, 404, "RepoNotFound")
        commit = self._resolve(repo_id, rev)
        if commit is None:
            return self._error(req, 404, "RevisionNotFound")
        files = self.repos[repo_id].commits[commit]
        if name not in files:
            return self._error(req, 404, "EntryNotFound", commit)
        data = files[name]
        dropping = name in self.drop and self.drop[name][1] > 0
        if not head and name in self.fail and not dropping:  # a pending drop happens first
            return self._error(req, self.fail[name], None, commit)
        served = self.corrupt.get(name, data)
        start = 0
        range_header = req.headers.get("Range")
        if range_header and range_header.startswith("bytes=") and not head and not self.ignore_range:
            start = int(range_header[len("bytes=") :].split("-")[0])
        body = served[start:]
        req.send_response(206 if start else 200)
        req.send_header("X-Repo-Commit", commit)
        if name.endswith(LFS_SUFFIXES):
            req.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
            req.send_header("X-Linked-Size", str(len(data)))
            req.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        else:
            req.send_header("ETag", f'"{_git_blob_id(data)}"')
        if start:
            req.send_header("Content-Range", f"bytes {start}-{len(served) - 1}/{len(served)}")
        req.send_header("Accept-Ranges", "bytes")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        if head:
            return None
        plan = self.drop.get(name)
        if plan is not None and plan[1] > 0:
            plan[1] -= 1
            req.wfile.write(body[: plan[0]])
            req.wfile.flush()
            req.close_connection = True
            return None
        req.wfile.write(body)
        return None


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
