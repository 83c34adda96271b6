"""A local stand-in for the Hugging Face Hub's HTTP API, for tests only (Python standard library only).

It speaks enough of the Hub's protocol for the *real* ``huggingface_hub`` client (checked against 2.4.0, see
docs/HUBSERVER.md for the route table and the source location of every field) to create repos, upload
(preupload -> LFS batch -> PUT -> ndjson commit) and download (repo info, tree listing, HEAD/GET resolve with
Range, ``snapshot_download``, ``hf_hub_download``). Point the client at it with::

    HF_ENDPOINT=http://127.0.0.1:PORT HF_HUB_DISABLE_XET=1 ...

``HF_HUB_DISABLE_XET=1`` is required for uploads: huggingface_hub 2.x decides client-side (``is_xet_available``)
to upload through Xet whenever ``hf_xet`` is installed, whatever the server says. This server never advertises Xet
(no ``X-Xet-*`` headers, no ``xetHash``, never ``"transfer": "xet"``).

Standalone::

    python -m tests.hubserver --port 8765 --root /tmp/hub [--token hf_xxx]

In tests::

    with HubServer(tmp_path / "hub", token="hf_test") as hub:
        hub.url                      # http://127.0.0.1:<free port>
        hub.drop_lfs_put(nth=1)      # fault injection, see HubServer
        hub.requests                 # every request: method, path, status, bytes in/out, kind

State (repos, refs, commits, regular blobs, LFS objects) lives on disk under ``root`` so a restart keeps it.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import fnmatch
import functools
import hashlib
import hmac
import io
import json
import os
import re
import secrets
import shutil
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

# URL segment after /api/ -> repo type, and the prefix of web URLs (resolve, .git) per repo type.
API_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
WEB_PREFIXES = {"datasets": "dataset", "spaces": "space"}

# The Hub refuses regular (non-LFS) files above 10 MiB; preupload sends larger ones to LFS.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
SIGNED_URL_TTL = 24 * 3600
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
SHORT_COMMIT_RE = re.compile(r"^[0-9a-f]{7,39}$")
CHUNK = 1024 * 1024

# What a new repo's first commit holds on the Hub: the usual .gitattributes (LFS patterns).
DEFAULT_GITATTRIBUTES = "".join(
    f"{p} filter=lfs diff=lfs merge=lfs -text\n"
    for p in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
        "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
        "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*",
        "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
)


def now_iso() -> str:
    """Hub date format, the one `huggingface_hub.utils.parse_datetime` expects: 2024-01-31T12:00:00.000Z."""
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _is_binary(sample: bytes) -> bool:
    """The Hub sends binary-looking files to LFS: NUL bytes or invalid UTF-8 (a cut multi-byte tail is fine)."""
    if b"\x00" in sample:
        return True
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start < len(sample) - 3
    return False


def _attr_match(pattern: str, path: str) -> bool:
    """gitattributes/gitignore-style match: a pattern without '/' matches the basename anywhere."""
    pattern = pattern.strip()
    if pattern.startswith("/"):
        pattern = pattern[1:]
        return fnmatch.fnmatchcase(path, pattern)
    if pattern.endswith("/"):  # a folder: everything under it
        folder = pattern.rstrip("/")
        parts = path.split("/")[:-1]
        return any(fnmatch.fnmatchcase(p, folder) for p in parts) if "/" not in folder else \
            path.startswith(folder + "/")
    if "/" not in pattern:
        return fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern)
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, pattern.replace("**/", ""))


def lfs_patterns(gitattributes: str) -> list[str]:
    out = []
    for line in gitattributes.splitlines():
        parts = line.strip().split()
        if parts and not parts[0].startswith("#") and "filter=lfs" in parts[1:]:
            out.append(parts[0].replace("[[:space:]]", " "))
    return out


def ignore_patterns(gitignore: str) -> list[str]:
    return [ln.strip() for ln in gitignore.splitlines() if ln.strip() and not ln.strip().startswith(("#", "!"))]


class HubError(Exception):
    """An HTTP error answered the way the Hub does: JSON body {"error": ...} plus X-Error-Code/X-Error-Message,
    the headers `huggingface_hub.utils._http.hf_raise_for_status` maps to RepositoryNotFoundError (RepoNotFound),
    RevisionNotFoundError (RevisionNotFound), RemoteEntryNotFoundError (EntryNotFound)."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None,
                 body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}
        self.body = body


def repo_not_found(status: int = 404) -> HubError:
    return HubError(status, "Repository not found", "RepoNotFound")


# -- storage --------------------------------------------------------------------------------------------------------


class Store:
    """Repos on disk::

        root/repos/<type>s/<ns>/<name>/repo.json        id, type, private, createdAt, _id
                                       refs.json        {"refs/heads/main": sha, "refs/tags/..": sha, "refs/pr/1": sha}
                                       commits/<sha>.json   parents, title, message, date, authors, files
                                       blobs/<git sha1>     regular file contents
                                       lfs/<sha256>         LFS objects (per repo, as on the Hub)
                                       lfs/tmp/             uploads in progress

    A commit's `files` maps every path to {oid (git blob sha1 of the content, or of the LFS pointer), size (real
    size), lfs ({oid: sha256, size, pointerSize} or null), lastCommit (sha of the commit that last changed it)}.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        secret_file = self.root / "secret"
        if not secret_file.exists():
            _atomic_write(secret_file, secrets.token_hex(32).encode())
        self.secret = secret_file.read_bytes().strip()
        self._commits: dict[tuple[str, str, str], dict] = {}

    # paths
    def repo_dir(self, rtype: str, repo_id: str) -> Path:
        return self.root / "repos" / f"{rtype}s" / repo_id

    def exists(self, rtype: str, repo_id: str) -> bool:
        return (self.repo_dir(rtype, repo_id) / "repo.json").is_file()

    def meta(self, rtype: str, repo_id: str) -> dict:
        try:
            return json.loads((self.repo_dir(rtype, repo_id) / "repo.json").read_text())
        except FileNotFoundError:
            raise repo_not_found() from None

    def save_meta(self, rtype: str, repo_id: str, meta: dict) -> None:
        _write_json(self.repo_dir(rtype, repo_id) / "repo.json", meta)

    def refs(self, rtype: str, repo_id: str) -> dict[str, str]:
        return json.loads((self.repo_dir(rtype, repo_id) / "refs.json").read_text())

    def save_refs(self, rtype: str, repo_id: str, refs: dict[str, str]) -> None:
        _write_json(self.repo_dir(rtype, repo_id) / "refs.json", refs)

    def commit(self, rtype: str, repo_id: str, sha: str) -> dict:
        key = (rtype, repo_id, sha)
        if key not in self._commits:
            self._commits[key] = json.loads((self.repo_dir(rtype, repo_id) / "commits" / f"{sha}.json").read_text())
        return self._commits[key]

    def commit_shas(self, rtype: str, repo_id: str) -> list[str]:
        return [p.stem for p in (self.repo_dir(rtype, repo_id) / "commits").glob("*.json")]

    def blob_path(self, rtype: str, repo_id: str, sha1: str) -> Path:
        return self.repo_dir(rtype, repo_id) / "blobs" / sha1

    def lfs_path(self, rtype: str, repo_id: str, oid: str) -> Path:
        return self.repo_dir(rtype, repo_id) / "lfs" / oid

    def lfs_tmp(self, rtype: str, repo_id: str) -> Path:
        d = self.repo_dir(rtype, repo_id) / "lfs" / "tmp"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def lfs_size(self, rtype: str, repo_id: str, oid: str) -> int | None:
        p = self.lfs_path(rtype, repo_id, oid)
        return p.stat().st_size if p.is_file() else None

    # revisions
    def resolve(self, rtype: str, repo_id: str, rev: str) -> tuple[str, str | None]:
        """(commit sha, full ref name or None) for a branch, tag, refs/pr/N, full or short commit sha."""
        refs = self.refs(rtype, repo_id)
        for ref in (rev, f"refs/heads/{rev}", f"refs/tags/{rev}"):
            if ref.startswith("refs/") and ref in refs:
                return refs[ref], ref
        shas = self.commit_shas(rtype, repo_id)
        if COMMIT_RE.match(rev) and rev in shas:
            return rev, None
        if SHORT_COMMIT_RE.match(rev):
            hits = [s for s in shas if s.startswith(rev)]
            if len(hits) == 1:
                return hits[0], None
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    # writes
    def put_blob(self, rtype: str, repo_id: str, data: bytes) -> str:
        sha1 = git_blob_sha1(data)
        p = self.blob_path(rtype, repo_id, sha1)
        if not p.exists():
            _atomic_write(p, data)
        return sha1

    def new_commit(self, rtype: str, repo_id: str, parent: str | None, files: dict[str, dict], changed: set[str],
                   title: str, message: str, author: str) -> str:
        date = now_iso()
        seed = json.dumps([parent, title, message, date, sorted(files), secrets.token_hex(8)]).encode()
        sha = hashlib.sha1(b"commit " + seed).hexdigest()
        files = {p: dict(e, lastCommit=sha) if p in changed else e for p, e in files.items()}
        commit = {"id": sha, "parents": [parent] if parent else [], "title": title, "message": message,
                  "date": date, "authors": [author], "files": files}
        _write_json(self.repo_dir(rtype, repo_id) / "commits" / f"{sha}.json", commit)
        self._commits[(rtype, repo_id, sha)] = commit
        return sha

    def create_repo(self, rtype: str, repo_id: str, private: bool, author: str, extra: dict | None = None) -> dict:
        d = self.repo_dir(rtype, repo_id)
        d.mkdir(parents=True, exist_ok=True)
        meta = {"_id": secrets.token_hex(12), "id": repo_id, "type": rtype, "private": bool(private),
                "createdAt": now_iso(), **(extra or {})}
        data = DEFAULT_GITATTRIBUTES.encode()
        sha1 = self.put_blob(rtype, repo_id, data)
        files = {".gitattributes": {"oid": sha1, "size": len(data), "lfs": None}}
        sha = self.new_commit(rtype, repo_id, None, files, {".gitattributes"}, "initial commit", "", "system")
        self.save_refs(rtype, repo_id, {"refs/heads/main": sha})
        self.save_meta(rtype, repo_id, meta)  # last: repo.json is what makes the repo exist
        return meta

    def delete_repo(self, rtype: str, repo_id: str) -> None:
        shutil.rmtree(self.repo_dir(rtype, repo_id))
        self._commits = {k: v for k, v in self._commits.items() if k[:2] != (rtype, repo_id)}

    def read_file(self, rtype: str, repo_id: str, entry: dict) -> bytes:
        if entry.get("lfs"):
            return self.lfs_path(rtype, repo_id, entry["lfs"]["oid"]).read_bytes()
        return self.blob_path(rtype, repo_id, entry["oid"]).read_bytes()

    # signing (upload/download URLs carry no Authorization header, like S3 pre-signed URLs)
    def sign(self, *parts: Any) -> str:
        return hmac.new(self.secret, "|".join(map(str, parts)).encode(), hashlib.sha256).hexdigest()[:32]


# -- faults ---------------------------------------------------------------------------------------------------------


class Faults:
    """Fault injection state, settable at runtime from any thread (see the HubServer methods)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.put_count = 0  # LFS PUTs seen (single-part and multipart parts)
        self.put_drops: list[dict] = []  # {"first": n, "last": n, "mode": ...}
        self.commit_failures: list[dict] = []  # FIFO of {"status", "message"}
        self.corrupt: dict[str, dict] = {}  # path -> {"mode", "offset", "repo_id"}
        self.download_drops: dict[str, dict] = {}  # path -> {"after_bytes", "times", "repo_id"}

    def next_put(self) -> tuple[int, str | None]:
        with self.lock:
            self.put_count += 1
            n = self.put_count
            for d in self.put_drops:
                if d["first"] <= n <= d["last"]:
                    return n, d["mode"]
            return n, None

    def take_commit_failure(self) -> dict | None:
        with self.lock:
            return self.commit_failures.pop(0) if self.commit_failures else None

    def corruption(self, repo_id: str, path: str) -> dict | None:
        with self.lock:
            c = self.corrupt.get(path)
            return c if c and c["repo_id"] in (None, repo_id) else None

    def take_download_drop(self, repo_id: str, path: str) -> int | None:
        with self.lock:
            d = self.download_drops.get(path)
            if not d or d["repo_id"] not in (None, repo_id) or d["times"] <= 0:
                return None
            d["times"] -= 1
            return d["after_bytes"]


# -- HTTP -----------------------------------------------------------------------------------------------------------


class _Dropped(Exception):
    """Raised to end a request by closing the socket without (the rest of) a response."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mm-convert-hubserver/1"
    timeout = 120  # idle keep-alive connections end after this
    disable_nagle_algorithm = True  # headers and body go out in separate writes: avoid the 40 ms delayed-ACK stall

    # plumbing ---------------------------------------------------------------------------------------------------

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    @property
    def store(self) -> Store:
        return self.hub.store

    def log_message(self, format: str, *args: Any) -> None:
        pass  # our own log, one line per request, in _log()

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def send_response(self, code: int, message: str | None = None) -> None:
        self._status = code
        super().send_response(code, message)

    def _dispatch(self) -> None:
        self._status: int | None = None
        self._bytes_in = 0
        self._bytes_out = 0
        self._kind = "other"
        self._dropped = False
        self._body_left: int | None = None
        self._chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
        cl = self.headers.get("Content-Length")
        self._body_left = int(cl) if cl and not self._chunked else (None if self._chunked else 0)
        self._chunk_left = 0
        self._chunk_eof = not self._chunked
        self._request_id = self.headers.get("X-Amzn-Trace-Id") or self.headers.get("X-Request-Id") or \
            uuid.uuid4().hex
        url = urlsplit(self.path)
        self._query = parse_qs(url.query, keep_blank_values=True)
        segs = [unquote(s) for s in url.path.split("/")[1:]]
        try:
            self._route(self.command, segs)
        except HubError as e:
            self._send_error(e)
        except _Dropped:
            self._dropped = True
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self._dropped = True
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - a test server must answer, and say why
            traceback.print_exc()
            if self._status is None:
                self._send_error(HubError(500, f"hubserver internal error: {type(e).__name__}: {e}"))
            else:
                self.close_connection = True
        finally:
            self.hub._log(self.command, url.path, self._status, self._bytes_in, self._bytes_out, self._kind,
                          self._dropped, dict(self.headers))

    # request bodies -----------------------------------------------------------------------------------------------

    def _read_some(self, n: int) -> bytes:
        """Up to n bytes of the request body (Content-Length or chunked); b'' at the end."""
        if self._chunked:
            if self._chunk_eof:
                return b""
            if self._chunk_left == 0:
                line = self.rfile.readline(65537)
                if not line:
                    raise _Dropped()  # the client went away inside a chunked body
                try:
                    size = int(line.split(b";")[0].strip(), 16)
                except ValueError:
                    raise HubError(400, "Malformed chunked body") from None
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    self._chunk_eof = True
                    return b""
                self._chunk_left = size
            data = self.rfile.read(min(n, self._chunk_left))
            if not data:
                raise _Dropped()
            self._chunk_left -= len(data)
            if self._chunk_left == 0:
                self.rfile.readline(3)  # CRLF after the chunk
        else:
            if not self._body_left:
                return b""
            data = self.rfile.read(min(n, self._body_left))
            self._body_left -= len(data)
            if not data:
                raise _Dropped()
        self._bytes_in += len(data)
        return data

    def _iter_body(self, limit: int | None = None) -> Iterator[bytes]:
        got = 0
        while limit is None or got < limit:
            data = self._read_some(CHUNK if limit is None else min(CHUNK, limit - got))
            if not data:
                return
            got += len(data)
            yield data

    def _read_body(self) -> bytes:
        return b"".join(self._iter_body())

    def _read_json(self) -> Any:
        raw = self._read_body()
        try:
            return json.loads(raw or b"null")
        except ValueError:
            raise HubError(400, "Invalid JSON body") from None

    def _body_pending(self) -> bool:
        return (self._chunked and not self._chunk_eof) or bool(self._body_left)

    def _drain(self) -> None:
        """Before an early answer: read what is left of a small body, else close the connection after answering."""
        if not self._body_pending():
            return
        if self._body_left is not None and self._body_left > 16 * CHUNK:
            self.close_connection = True
            return
        for _ in self._iter_body():
            pass

    # responses ----------------------------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json; charset=utf-8") -> None:
        self._drain()
        self.send_response(status)
        hdrs = {"Content-Type": content_type, "Content-Length": str(len(body)), "X-Request-Id": self._request_id}
        hdrs.update(headers or {})
        if self.close_connection:
            hdrs["Connection"] = "close"
        for k, v in hdrs.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
            self._bytes_out += len(body)

    def _send_json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None,
                   content_type: str = "application/json; charset=utf-8") -> None:
        self._send(status, json.dumps(obj).encode(), headers, content_type)

    def _send_error(self, e: HubError) -> None:
        headers = dict(e.headers)
        headers["X-Error-Message"] = e.message.encode("latin-1", "replace").decode("latin-1").replace("\n", " ")
        if e.code:
            headers["X-Error-Code"] = e.code
        body = e.body if e.body is not None else {"error": e.message}
        self._send_json(body, e.status, headers)

    def _base_url(self) -> str:
        return f"http://{self.headers.get('Host') or self.hub.netloc}"

    # auth ---------------------------------------------------------------------------------------------------------

    def _token(self) -> str | None:
        h = self.headers.get("Authorization") or ""
        return h[7:].strip() if h.lower().startswith("bearer ") else None

    def _auth(self, write: bool = False, meta: dict | None = None) -> str:
        """The user name; 401 the way the Hub answers (a wrong token, a write without one, a private repo)."""
        expected, token = self.hub.token, self._token()
        if expected is None:
            return self.hub.user
        if token is not None and not hmac.compare_digest(token, expected):
            raise HubError(401, "Invalid credentials in Authorization header")
        if token is None and write:
            raise HubError(401, "You must be authenticated to write: pass a token (Authorization: Bearer ...)")
        if token is None and meta is not None and meta.get("private"):
            raise repo_not_found(401)  # the Hub does not reveal that a private repo exists
        return self.hub.user

    def _repo(self, rtype: str, repo_id: str, write: bool = False) -> dict:
        if not self.store.exists(rtype, repo_id):
            self._auth(write=write)  # a bad token is reported as such, even for a missing repo
            raise repo_not_found()
        meta = self.store.meta(rtype, repo_id)
        self._auth(write=write, meta=meta)
        return meta

    # routing ------------------------------------------------------------------------------------------------------

    def _route(self, method: str, segs: list[str]) -> None:
        if segs and segs[0] == "api":
            return self._route_api(method, segs[1:])
        if segs and segs[0] == "lfs-upload":
            return self._lfs_upload(method, segs[1:])
        if segs and segs[0] == "lfs-cdn":
            return self._lfs_cdn(method, segs[1:])
        # web routes: [datasets/|spaces/]ns/name(.git/info/lfs/objects/...|/resolve/rev/path|/raw/rev/path)
        rtype = "model"
        if segs and segs[0] in WEB_PREFIXES:
            rtype, segs = WEB_PREFIXES[segs[0]], segs[1:]
        if len(segs) >= 6 and segs[1].endswith(".git") and segs[2:5] == ["info", "lfs", "objects"]:
            repo_id = f"{segs[0]}/{segs[1][:-4]}"
            if segs[5] == "batch" and method == "POST":
                return self._lfs_batch(rtype, repo_id)
            if segs[5] == "verify" and method == "POST":
                return self._lfs_verify(rtype, repo_id)
        if len(segs) >= 5 and segs[2] in ("resolve", "raw") and method in ("GET", "HEAD"):
            return self._resolve(rtype, f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]), raw=segs[2] == "raw")
        raise HubError(404, f"hubserver: no route for {method} {self.path.split('?')[0]}")

    def _route_api(self, method: str, segs: list[str]) -> None:
        if segs == ["whoami-v2"] and method == "GET":
            return self._whoami()
        if segs == ["agent-harnesses"] and method == "GET":  # utils/_detect_agent.py fetches it once a day
            self._kind = "agent-harnesses"
            return self._send_json({"standardEnvVars": [], "harnesses": {}})
        if segs and segs[0] == "telemetry":
            self._kind = "telemetry"
            return self._send_json({})
        if segs == ["validate-yaml"] and method == "POST":
            return self._validate_yaml()
        if segs == ["repos", "create"] and method == "POST":
            return self._create_repo()
        if segs == ["repos", "delete"] and method == "DELETE":
            return self._delete_repo()
        if len(segs) >= 3 and segs[0] in API_TYPES:
            rtype, repo_id, rest = API_TYPES[segs[0]], f"{segs[1]}/{segs[2]}", segs[3:]
            if not rest and method == "GET":
                return self._repo_info(rtype, repo_id, None)
            action = rest[0] if rest else ""
            if action == "revision" and len(rest) >= 2 and method == "GET":
                return self._repo_info(rtype, repo_id, "/".join(rest[1:]))
            if action == "tree" and len(rest) >= 2 and method == "GET":
                return self._tree(rtype, repo_id, rest[1], "/".join(rest[2:]).strip("/"))
            if action == "paths-info" and len(rest) == 2 and method == "POST":
                return self._paths_info(rtype, repo_id, rest[1])
            if action == "preupload" and len(rest) == 2 and method == "POST":
                return self._preupload(rtype, repo_id, rest[1])
            if action == "commit" and len(rest) == 2 and method == "POST":
                return self._commit(rtype, repo_id, rest[1])
            if action == "refs" and len(rest) == 1 and method == "GET":
                return self._list_refs(rtype, repo_id)
            if action == "commits" and len(rest) >= 2 and method == "GET":
                return self._list_commits(rtype, repo_id, "/".join(rest[1:]))
            if action == "branch" and len(rest) >= 2 and method in ("POST", "DELETE"):
                return self._branch(method, rtype, repo_id, "/".join(rest[1:]))
            if action == "tag" and len(rest) >= 2 and method in ("POST", "DELETE"):
                return self._tag(method, rtype, repo_id, "/".join(rest[1:]))
        raise HubError(404, f"hubserver: no route for {method} /api/{'/'.join(segs)}")

    # account / misc -----------------------------------------------------------------------------------------------

    def _whoami(self) -> None:
        self._kind = "whoami"
        if self._token() is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        user = self._auth()
        self._send_json({
            "type": "user", "id": hashlib.sha1(user.encode()).hexdigest()[:24], "name": user, "fullname": user,
            "email": None, "emailVerified": False, "canPay": False, "isPro": False, "periodEnd": None,
            "avatarUrl": "", "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "hubserver", "role": "write",
                                                             "createdAt": now_iso()}},
        })

    def _validate_yaml(self) -> None:
        """README.md front matter check. The client reads the JSON before raising, so errors are JSON too."""
        self._kind = "validate-yaml"
        body = self._read_json() or {}
        content = body.get("content") or ""
        lines = content.splitlines()
        errors = []
        if lines and lines[0].strip() == "---" and not any(ln.strip() == "---" for ln in lines[1:]):
            errors.append({"message": "Metadata block opened with '---' is never closed"})
        elif lines and lines[0].strip() == "---":
            end = next(i for i, ln in enumerate(lines[1:], 1) if ln.strip() == "---")
            for i, ln in enumerate(lines[1:end], 2):
                if "\t" in ln[: len(ln) - len(ln.lstrip())]:
                    errors.append({"message": f"line {i}: tabs are not allowed in YAML indentation"})
        if errors:
            return self._send_json({"errors": errors, "warnings": [], "error": errors[0]["message"]}, 400)
        self._send_json({"errors": [], "warnings": []})

    # repos --------------------------------------------------------------------------------------------------------

    def _create_repo(self) -> None:
        self._kind = "repo-create"
        user = self._auth(write=True)
        body = self._read_json() or {}
        name, org = body.get("name"), body.get("organization")
        rtype = body.get("type") or "model"
        if rtype not in URL_PREFIX:
            raise HubError(400, f"Invalid repo type {rtype!r}")
        ns = org or user
        if not isinstance(name, str) or not NAME_RE.match(name) or not NAME_RE.match(ns) or \
                ".." in name or "--" in name:
            raise HubError(400, f"Invalid repo name {ns}/{name}: letters, digits, '-', '_', '.'; no '--' or '..'")
        repo_id = f"{ns}/{name}"
        url = f"{self._base_url()}/{URL_PREFIX[rtype]}{repo_id}"
        # 1.x sends "private": bool, 2.x sends "visibility": "public" | "private" | "protected".
        private = body.get("private")
        if body.get("visibility") is not None:
            private = body["visibility"] in ("private", "protected")
        with self.store.lock:
            if self.store.exists(rtype, repo_id):
                raise HubError(409, f"You already created this {rtype} repo", body={
                    "error": f"You already created this {rtype} repo", "url": url})
            extra = {"sdk": body["sdk"]} if rtype == "space" and body.get("sdk") else {}
            meta = self.store.create_repo(rtype, repo_id, bool(private), user, extra)
        self._send_json({"url": url, "name": repo_id, "id": meta["_id"]})

    def _delete_repo(self) -> None:
        self._kind = "repo-delete"
        user = self._auth(write=True)
        body = self._read_json() or {}
        rtype = body.get("type") or "model"
        repo_id = f"{body.get('organization') or user}/{body.get('name')}"
        with self.store.lock:
            self._repo(rtype, repo_id, write=True)
            self.store.delete_repo(rtype, repo_id)
        self._send_json({})

    def _files_at(self, rtype: str, repo_id: str, rev: str) -> tuple[str, str | None, dict[str, dict]]:
        sha, ref = self.store.resolve(rtype, repo_id, rev)
        return sha, ref, self.store.commit(rtype, repo_id, sha)["files"]

    def _repo_info(self, rtype: str, repo_id: str, rev: str | None) -> None:
        """GET /api/{type}s/{repo}[/revision/{rev}]: ModelInfo/DatasetInfo/SpaceInfo fields (hf_api.py)."""
        self._kind = "repo-info"
        meta = self._repo(rtype, repo_id)
        with self.store.lock:
            sha, _, files = self._files_at(rtype, repo_id, rev or "main")
            commit = self.store.commit(rtype, repo_id, sha)
        q = self._query
        blobs = (q.get("blobs") or ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path in sorted(files):
            e = files[path]
            s: dict[str, Any] = {"rfilename": path}
            if blobs:
                s.update(size=e["size"], blobId=e["oid"])
                if e.get("lfs"):
                    s["lfs"] = {"sha256": e["lfs"]["oid"], "size": e["lfs"]["size"],
                                "pointerSize": e["lfs"]["pointerSize"]}
            siblings.append(s)
        ns = repo_id.split("/")[0]
        info: dict[str, Any] = {
            "_id": meta["_id"], "id": repo_id, "author": ns, "sha": sha, "lastModified": commit["date"],
            "createdAt": meta["createdAt"], "private": meta["private"], "disabled": False, "gated": False,
            "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
            "usedStorage": sum(e["size"] for e in files.values()),
        }
        if rtype == "model":
            info.update(modelId=repo_id, spaces=[])
        elif rtype == "space":
            info.update(sdk=meta.get("sdk"), subdomain=repo_id.replace("/", "-").lower())
        if (q.get("securityStatus") or ["false"])[0].lower() in ("1", "true"):
            info["securityRepoStatus"] = {"scansDone": True, "filesWithIssues": []}
        expand = [v for vals in (q.get("expand", []) + q.get("expand[]", [])) for v in vals.split(",") if v]
        if expand:  # the Hub then returns only the requested properties (plus the ids)
            info = {k: v for k, v in info.items() if k in ("_id", "id") or k in expand}
        self._send_json(info)

    # tree ---------------------------------------------------------------------------------------------------------

    def _file_entry(self, rtype: str, repo_id: str, path: str, e: dict, expand: bool) -> dict:
        out: dict[str, Any] = {"type": "file", "oid": e["oid"], "size": e["size"], "path": path}
        if e.get("lfs"):
            out["lfs"] = {"oid": e["lfs"]["oid"], "size": e["lfs"]["size"], "pointerSize": e["lfs"]["pointerSize"]}
        if expand:
            out["lastCommit"] = self._last_commit(rtype, repo_id, [e.get("lastCommit")])
            out["securityFileStatus"] = {"status": "safe", "avScan": {"virusFound": False, "virusNames": None},
                                         "pickleImportScan": None}
        return out

    def _dir_entry(self, rtype: str, repo_id: str, path: str, files: dict[str, dict], expand: bool) -> dict:
        inside = sorted(p for p in files if p.startswith(path + "/"))
        oid = hashlib.sha1("\n".join(f"{p} {files[p]['oid']}" for p in inside).encode()).hexdigest()
        out: dict[str, Any] = {"type": "directory", "oid": oid, "size": 0, "path": path}
        if expand:
            out["lastCommit"] = self._last_commit(rtype, repo_id, [files[p].get("lastCommit") for p in inside])
        return out

    def _last_commit(self, rtype: str, repo_id: str, shas: list[str | None]) -> dict | None:
        commits = [self.store.commit(rtype, repo_id, s) for s in set(shas) if s]
        if not commits:
            return None
        c = max(commits, key=lambda c: c["date"])
        return {"id": c["id"], "title": c["title"], "date": c["date"]}

    @staticmethod
    def _dirs(files: dict[str, dict]) -> set[str]:
        return {"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)}

    def _tree(self, rtype: str, repo_id: str, rev: str, path: str) -> None:
        """GET /api/{type}s/{repo}/tree/{rev}[/{path}]?recursive=&expand=&cursor= : a JSON list, next page in a
        Link header (utils/_pagination.py follows `rel="next"`). 1000 entries a page, 50 with expand, like the Hub;
        HubServer.tree_page_size overrides both."""
        self._kind = "tree"
        self._repo(rtype, repo_id)
        q = self._query
        recursive = (q.get("recursive") or ["false"])[0].lower() in ("1", "true")
        expand = (q.get("expand") or ["false"])[0].lower() in ("1", "true")
        with self.store.lock:
            sha, _, files = self._files_at(rtype, repo_id, rev)
            dirs = self._dirs(files)
            if path and path not in dirs:
                raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
            prefix = path + "/" if path else ""

            def wanted(p: str) -> bool:
                return p.startswith(prefix) and (recursive or "/" not in p[len(prefix):])

            paths = sorted([(p, "d") for p in dirs if wanted(p)] + [(p, "f") for p in files if wanted(p)])
            start = 0
            if q.get("cursor"):
                try:
                    start = int(base64.urlsafe_b64decode(q["cursor"][0].encode()).decode())
                except ValueError:
                    raise HubError(400, "Invalid cursor") from None
            limit = self.hub.tree_page_size or (50 if expand else 1000)
            page = paths[start:start + limit]
            out = [self._dir_entry(rtype, repo_id, p, files, expand) if kind == "d" else
                   self._file_entry(rtype, repo_id, p, files[p], expand) for p, kind in page]
        headers = {}
        if start + limit < len(paths):
            cursor = base64.urlsafe_b64encode(str(start + limit).encode()).decode()
            nxt = (f"{self._base_url()}/api/{rtype}s/{repo_id}/tree/{quote(rev, safe='')}"
                   f"{'/' + quote(path, safe='') if path else ''}?"
                   + urlencode({"recursive": str(recursive).lower(), "expand": str(expand).lower(), "cursor": cursor}))
            headers["Link"] = f'<{nxt}>; rel="next"'
        self._send_json(out, headers=headers)

    def _paths_info(self, rtype: str, repo_id: str, rev: str) -> None:
        """POST /api/{type}s/{repo}/paths-info/{rev}, form-encoded paths=..&paths=..&expand=true|false (or JSON)."""
        self._kind = "paths-info"
        self._repo(rtype, repo_id)
        raw = self._read_body()
        if "json" in (self.headers.get("Content-Type") or ""):
            body = json.loads(raw or b"{}")
            paths, expand = body.get("paths") or [], bool(body.get("expand"))
        else:
            form = parse_qs(raw.decode(), keep_blank_values=True)
            paths = form.get("paths", []) + form.get("paths[]", [])
            expand = (form.get("expand") or ["false"])[0].lower() in ("1", "true")
        with self.store.lock:
            _, _, files = self._files_at(rtype, repo_id, rev)
            dirs = self._dirs(files)
            out = []
            for p in paths:
                p = p.strip("/")
                if p in files:
                    out.append(self._file_entry(rtype, repo_id, p, files[p], expand))
                elif p in dirs:
                    out.append(self._dir_entry(rtype, repo_id, p, files, expand))
        self._send_json(out)

    # refs ---------------------------------------------------------------------------------------------------------

    def _list_refs(self, rtype: str, repo_id: str) -> None:
        self._kind = "refs"
        self._repo(rtype, repo_id)
        refs = self.store.refs(rtype, repo_id)

        def fmt(prefix: str) -> list[dict]:
            return [{"name": r[len(prefix):] if prefix != "refs/pr/" else r, "ref": r, "targetCommit": s}
                    for r, s in sorted(refs.items()) if r.startswith(prefix)]

        out = {"branches": fmt("refs/heads/"), "converts": fmt("refs/convert/"), "tags": fmt("refs/tags/")}
        if self._query.get("include_prs"):
            out["pullRequests"] = fmt("refs/pr/")
        self._send_json(out)

    def _list_commits(self, rtype: str, repo_id: str, rev: str) -> None:
        self._kind = "commits"
        self._repo(rtype, repo_id)
        with self.store.lock:
            sha, _ = self.store.resolve(rtype, repo_id, rev)
            out = []
            while sha:
                c = self.store.commit(rtype, repo_id, sha)
                out.append({"id": c["id"], "title": c["title"], "message": c["message"], "date": c["date"],
                            "authors": [{"user": a, "avatar": ""} for a in c["authors"]]})
                sha = c["parents"][0] if c["parents"] else None
        self._send_json(out)

    def _branch(self, method: str, rtype: str, repo_id: str, branch: str) -> None:
        self._kind = "branch"
        self._repo(rtype, repo_id, write=True)
        body = self._read_json() if method == "POST" else None
        ref = f"refs/heads/{branch}"
        with self.store.lock:
            refs = self.store.refs(rtype, repo_id)
            if method == "DELETE":
                if ref not in refs:
                    raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
                if branch == "main":
                    raise HubError(403, "Cannot delete the default branch")
                del refs[ref]
            else:
                if ref in refs:
                    raise HubError(409, "Reference already exists")
                start = (body or {}).get("startingPoint") or "main"
                refs[ref] = self.store.resolve(rtype, repo_id, start)[0]
            self.store.save_refs(rtype, repo_id, refs)
        self._send_json({})

    def _tag(self, method: str, rtype: str, repo_id: str, rev_or_tag: str) -> None:
        self._kind = "tag"
        self._repo(rtype, repo_id, write=True)
        with self.store.lock:
            refs = self.store.refs(rtype, repo_id)
            if method == "DELETE":
                if f"refs/tags/{rev_or_tag}" not in refs:
                    raise HubError(404, f"Invalid rev id: {rev_or_tag}", "RevisionNotFound")
                del refs[f"refs/tags/{rev_or_tag}"]
            else:
                body = self._read_json() or {}
                tag = body.get("tag")
                if not tag:
                    raise HubError(400, "Missing 'tag'")
                if f"refs/tags/{tag}" in refs:
                    raise HubError(409, "Tag already exists")
                refs[f"refs/tags/{tag}"] = self.store.resolve(rtype, repo_id, rev_or_tag)[0]
            self.store.save_refs(rtype, repo_id, refs)
        self._send_json({})

    # upload: preupload, LFS batch, PUT, verify, commit ------------------------------------------------------------

    def _preupload(self, rtype: str, repo_id: str, rev: str) -> None:
        """POST /api/{type}s/{repo}/preupload/{rev} {"files": [{path, sample (base64, first 512 bytes), size}],
        "gitIgnore"?}: per file uploadMode (lfs|regular), shouldIgnore, and the current oid at that path (sha256
        for LFS, git blob sha1 otherwise: what CommitOperationAdd._local_oid is compared to, _commit_api.py)."""
        self._kind = "preupload"
        self._repo(rtype, repo_id, write=True)
        body = self._read_json() or {}
        with self.store.lock:
            sha, _, files = self._files_at(rtype, repo_id, rev)
            attrs = body.get("gitAttributes")
            if attrs is None and ".gitattributes" in files:
                attrs = self.store.read_file(rtype, repo_id, files[".gitattributes"]).decode(errors="replace")
            ignore = body.get("gitIgnore")
            if ignore is None and ".gitignore" in files:
                ignore = self.store.read_file(rtype, repo_id, files[".gitignore"]).decode(errors="replace")
        lfs_pats, ign_pats = lfs_patterns(attrs or ""), ignore_patterns(ignore or "")
        out = []
        for f in body.get("files") or []:
            path, size = f.get("path"), f.get("size")
            if not isinstance(path, str) or not isinstance(size, int):
                raise HubError(400, "Each file needs a 'path' and an integer 'size'")
            try:
                sample = base64.b64decode(f.get("sample") or "")
            except ValueError:
                raise HubError(400, f"{path}: 'sample' is not base64") from None
            lfs = (any(_attr_match(p, path) for p in lfs_pats) or size > self.hub.lfs_threshold
                   or _is_binary(sample))
            item: dict[str, Any] = {"path": path, "uploadMode": "lfs" if lfs else "regular",
                                    "shouldIgnore": any(_attr_match(p, path) for p in ign_pats)}
            e = files.get(path)
            if e is not None:
                item["oid"] = e["lfs"]["oid"] if e.get("lfs") else e["oid"]
            out.append(item)
        self._send_json({"files": out, "commitOid": sha})

    def _signed_upload_url(self, rtype: str, repo_id: str, oid: str, size: int, part: int | None = None) -> str:
        exp = int(time.time()) + SIGNED_URL_TTL
        q = {"size": size, "exp": exp}
        if part is not None:
            q["part"] = part
        q["sig"] = self.store.sign("upload", rtype, repo_id, oid, size, part, exp)
        return f"{self._base_url()}/lfs-upload/{rtype}s/{repo_id}/{oid}?{urlencode(q)}"

    def _signed_cdn_url(self, rtype: str, repo_id: str, oid: str, path: str, host: str | None = None) -> str:
        exp = int(time.time()) + SIGNED_URL_TTL
        q = {"path": path, "exp": exp, "sig": self.store.sign("download", rtype, repo_id, oid, exp)}
        base = self._base_url() if host is None else f"http://{host}:{self.hub.port}"
        return f"{base}/lfs-cdn/{rtype}s/{repo_id}/{oid}?{urlencode(q)}"

    def _lfs_batch(self, rtype: str, repo_id: str) -> None:
        """POST /{repo}.git/info/lfs/objects/batch (git-lfs batch API, lfs.py:post_lfs_batch_info). Objects already
        stored get no `actions` (the client then skips them: that is what makes a re-publish upload nothing)."""
        self._kind = "lfs-batch"
        body = self._read_json() or {}
        op = body.get("operation")
        self._repo(rtype, repo_id, write=op == "upload")
        if op not in ("upload", "download"):
            raise HubError(400, "operation must be 'upload' or 'download'")
        if body.get("hash_algo", "sha256") != "sha256":
            raise HubError(409, "Only sha256 is supported", body={"message": "Only sha256 is supported"})
        ref = (body.get("ref") or {}).get("name")
        if op == "upload" and ref:
            self.store.resolve(rtype, repo_id, ref)  # fail early on a wrong branch, like the Hub
        chunk = self.hub.multipart_chunk_size
        objects, multipart = [], False
        for o in body.get("objects") or []:
            oid, size = o.get("oid"), o.get("size")
            if not isinstance(oid, str) or not SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
                objects.append({"oid": str(oid), "size": size if isinstance(size, int) else -1,
                                "error": {"code": 422, "message": "Invalid oid or size"}})
                continue
            stored = self.store.lfs_size(rtype, repo_id, oid)
            item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if op == "download":
                if stored is None:
                    item["error"] = {"code": 404, "message": "Object does not exist"}
                else:
                    item["actions"] = {"download": {"href": self._signed_cdn_url(rtype, repo_id, oid, ""),
                                                    "expires_in": SIGNED_URL_TTL}}
            elif stored != size:
                upload: dict[str, Any] = {"href": self._signed_upload_url(rtype, repo_id, oid, size),
                                          "expires_in": SIGNED_URL_TTL}
                if chunk and size > chunk:  # multipart: part URLs in the header, href is the completion URL
                    multipart = True
                    nparts = -(-size // chunk)
                    upload["header"] = {"chunk_size": str(chunk), **{
                        f"{i:05d}": self._signed_upload_url(rtype, repo_id, oid, size, part=i)
                        for i in range(1, nparts + 1)}}
                item["actions"] = {"upload": upload}
                if self.hub.lfs_verify:
                    item["actions"]["verify"] = {
                        "href": f"{self._base_url()}/{URL_PREFIX[rtype]}{repo_id}.git/info/lfs/objects/verify",
                        "expires_in": SIGNED_URL_TTL}
            objects.append(item)
        self._send_json({"transfer": "multipart" if multipart else "basic", "objects": objects,
                         "hash_algo": "sha256"}, content_type="application/vnd.git-lfs+json")

    def _check_signature(self, *signed: Any) -> None:
        """Check ?exp=&sig= against store.sign(*signed, exp): the same fields the URL was signed with."""
        q = self._query
        try:
            exp = int(q["exp"][0])
            sig = q["sig"][0]
        except (KeyError, ValueError, IndexError):
            raise HubError(403, "Missing or malformed signature") from None
        if exp < time.time():
            raise HubError(403, "Signed URL expired")
        if not hmac.compare_digest(sig, self.store.sign(*signed, exp)):
            raise HubError(403, "Invalid signature")

    def _lfs_upload(self, method: str, segs: list[str]) -> None:
        """PUT /lfs-upload/{type}s/{ns}/{name}/{oid}?size=&exp=&sig=[&part=N] (signed: the client sends no
        Authorization here, lfs.py:_upload_single_part); POST the same URL without part = multipart completion."""
        if len(segs) != 4 or segs[0][:-1] not in URL_PREFIX or not SHA256_RE.match(segs[3]):
            raise HubError(404, "No such upload URL")
        rtype, repo_id, oid = segs[0][:-1], f"{segs[1]}/{segs[2]}", segs[3]
        q = self._query
        try:
            size = int(q["size"][0])
            part = int(q["part"][0]) if "part" in q else None
        except (KeyError, ValueError):
            raise HubError(400, "Malformed upload URL") from None
        self._kind = "lfs-part" if part is not None else ("lfs-put" if method == "PUT" else "lfs-complete")
        if method == "PUT":
            self._check_signature("upload", rtype, repo_id, oid, size, part)
            if not self.store.exists(rtype, repo_id):
                raise repo_not_found()
            return self._lfs_put(rtype, repo_id, oid, size, part)
        if method == "POST" and part is None:
            self._check_signature("upload", rtype, repo_id, oid, size, None)
            return self._lfs_complete(rtype, repo_id, oid, size)
        raise HubError(405, f"{method} not allowed here")

    def _receive(self, dest: Path, expect: int | None, drop: str | None) -> tuple[int, str, str]:
        """Stream the request body to `dest`: (size, sha256, md5). `drop` closes the socket part-way."""
        sha, md5, n = hashlib.sha256(), hashlib.md5(), 0
        length = self._body_left if not self._chunked else expect
        limit = (length or 0) // 2 if drop == "mid_body" else None
        with open(dest, "wb") as fh:
            for data in self._iter_body(limit):
                fh.write(data)
                sha.update(data)
                md5.update(data)
                n += len(data)
        if drop == "mid_body":
            dest.unlink(missing_ok=True)
            raise _Dropped()
        return n, sha.hexdigest(), md5.hexdigest()

    def _lfs_put(self, rtype: str, repo_id: str, oid: str, size: int, part: int | None) -> None:
        _, drop = self.hub.faults.next_put()
        tmpdir = self.store.lfs_tmp(rtype, repo_id)
        chunk = self.hub.multipart_chunk_size
        if part is not None:
            if not chunk:
                raise HubError(400, "Multipart upload is not enabled")
            dest = tmpdir / f"{oid}.part{part:05d}"
            tmp = tmpdir / f"{oid}.part{part:05d}.{uuid.uuid4().hex[:8]}"
            expect = min(chunk, size - (part - 1) * chunk)
        else:
            dest = self.store.lfs_path(rtype, repo_id, oid)
            tmp = tmpdir / f"{oid}.{uuid.uuid4().hex[:8]}"
            expect = size
        try:
            n, sha256, md5 = self._receive(tmp, expect, drop)
            if drop == "before_response":
                raise _Dropped()
            if n != expect:
                raise HubError(400, f"Size mismatch: received {n} bytes, expected {expect}")
            if part is None and sha256 != oid:
                raise HubError(400, f"sha256 mismatch: received content hashes to {sha256}, expected {oid}")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        if drop == "after_store":
            raise _Dropped()
        self._send(200, b"", {"ETag": f'"{md5}"'}, content_type="text/plain")

    def _lfs_complete(self, rtype: str, repo_id: str, oid: str, size: int) -> None:
        body = self._read_json() or {}
        parts = body.get("parts") or []
        if body.get("oid") != oid or not parts:
            raise HubError(400, "Completion payload needs this oid and its parts")
        tmpdir = self.store.lfs_tmp(rtype, repo_id)
        out = tmpdir / f"{oid}.{uuid.uuid4().hex[:8]}"
        sha, n = hashlib.sha256(), 0
        try:
            with open(out, "wb") as fh:
                for i, p in enumerate(sorted(parts, key=lambda p: p["partNumber"]), 1):
                    pf = tmpdir / f"{oid}.part{i:05d}"
                    if p["partNumber"] != i or not pf.is_file():
                        raise HubError(400, f"Part {i} is missing")
                    data = pf.read_bytes()
                    if p.get("etag", "").strip('"') != hashlib.md5(data).hexdigest():
                        raise HubError(400, f"Part {i}: ETag does not match")
                    fh.write(data)
                    sha.update(data)
                    n += len(data)
            if n != size or sha.hexdigest() != oid:
                raise HubError(400, f"Assembled object is {n} bytes with sha256 {sha.hexdigest()}; expected "
                                    f"{size} bytes with sha256 {oid}")
            os.replace(out, self.store.lfs_path(rtype, repo_id, oid))
            for pf in tmpdir.glob(f"{oid}.part*"):
                pf.unlink(missing_ok=True)
        finally:
            out.unlink(missing_ok=True)
        self._send_json({})

    def _lfs_verify(self, rtype: str, repo_id: str) -> None:
        """POST {repo}.git/info/lfs/objects/verify {"oid", "size"}: lfs.py:lfs_upload calls it after the PUT."""
        self._kind = "lfs-verify"
        self._repo(rtype, repo_id, write=True)
        body = self._read_json() or {}
        stored = self.store.lfs_size(rtype, repo_id, str(body.get("oid")))
        if stored is None:
            raise HubError(404, "Object not found")
        if stored != body.get("size"):
            raise HubError(422, f"Size mismatch: stored {stored}, declared {body.get('size')}")
        self._send_json({}, content_type="application/vnd.git-lfs+json")

    def _commit(self, rtype: str, repo_id: str, rev: str) -> None:
        """POST /api/{type}s/{repo}/commit/{rev}, application/x-ndjson: a {"key": "header"} line, then "file"
        (base64 or utf-8 content), "lfsFile" (path, algo, oid, size; oldPath to copy), "deletedFile",
        "deletedFolder" lines (_commit_api.py:_prepare_commit_payload). Answers commitOid, commitUrl (and
        pullRequestUrl with ?create_pr=1). A commit that changes nothing is still a new commit, like the Hub: the
        client skips such commits itself (hf_api.py:create_commit, "No files have been modified")."""
        self._kind = "commit"
        user = self._auth(write=True)
        raw = self._read_body()
        fail = self.hub.faults.take_commit_failure()
        if fail is not None:
            raise HubError(fail["status"], fail["message"])
        self._repo(rtype, repo_id, write=True)
        ops = self._parse_commit_body(raw)
        header = ops[0]["value"] if ops and ops[0].get("key") == "header" else None
        if not isinstance(header, dict) or not header.get("summary"):
            raise HubError(400, "The first line must be the header, with a non-empty 'summary'")
        create_pr = (self._query.get("create_pr") or ["0"])[0] in ("1", "true")
        with self.store.lock:
            refs = self.store.refs(rtype, repo_id)
            sha, ref = self.store.resolve(rtype, repo_id, rev)
            if ref is None or not ref.startswith(("refs/heads/", "refs/pr/")):
                raise HubError(400, f"Can only commit to a branch (or a refs/pr/N ref), not {rev!r}")
            parent_hint = header.get("parentCommit")
            if parent_hint and not create_pr and not sha.startswith(parent_hint):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            if parent_hint and create_pr:
                sha = self.store.resolve(rtype, repo_id, parent_hint)[0]
            files = dict(self.store.commit(rtype, repo_id, sha)["files"])
            changed: set[str] = set()
            attrs_path = ".gitattributes"
            new_lfs_paths = []
            for op in ops[1:]:
                key, v = op.get("key"), op.get("value") or {}
                path = str(v.get("path", "")).strip("/")
                if not path or ".." in path.split("/") or path.split("/")[0] in (".git", ".cache"):
                    raise HubError(400, f"Invalid path {path!r}")
                if key == "file":
                    content = v.get("content", "")
                    if v.get("oldPath") is not None:
                        src = files.get(v["oldPath"])
                        if src is None:
                            raise HubError(404, f"Entry not found: {v['oldPath']}", "EntryNotFound")
                        files[path] = dict(src)
                    else:
                        data = base64.b64decode(content) if v.get("encoding") == "base64" else content.encode()
                        if len(data) > LFS_SIZE_THRESHOLD:
                            raise HubError(400, "Your push was rejected because it contains files larger than "
                                                f"10 MiB. Please use LFS. Offending files: - {path}")
                        files[path] = {"oid": self.store.put_blob(rtype, repo_id, data), "size": len(data),
                                       "lfs": None}
                    changed.add(path)
                elif key == "lfsFile":
                    if v.get("oldPath") is not None and not v.get("oid"):
                        src = files.get(v["oldPath"])
                        if src is None or not src.get("lfs"):
                            raise HubError(404, f"LFS entry not found: {v['oldPath']}", "EntryNotFound")
                        oid = src["lfs"]["oid"]
                    else:
                        oid = v.get("oid")
                        if v.get("algo", "sha256") != "sha256" or not isinstance(oid, str) \
                                or not SHA256_RE.match(oid):
                            raise HubError(400, f"{path}: lfsFile needs algo 'sha256' and a sha256 oid")
                    stored = self.store.lfs_size(rtype, repo_id, oid)
                    if stored is None:
                        raise HubError(400, f"Your push was rejected because an LFS pointer pointed to a file that "
                                            f"does not exist: {path} (sha256 {oid}); upload it first")
                    if v.get("size") is not None and v["size"] != stored:
                        raise HubError(400, f"{path}: declared size {v['size']} but the LFS object is {stored}")
                    pointer = lfs_pointer(oid, stored)
                    files[path] = {"oid": git_blob_sha1(pointer), "size": stored,
                                   "lfs": {"oid": oid, "size": stored, "pointerSize": len(pointer)}}
                    changed.add(path)
                    new_lfs_paths.append(path)
                elif key == "deletedFile":
                    if path not in files:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del files[path]
                elif key == "deletedFolder":
                    inside = [p for p in files if p.startswith(path + "/")]
                    if not inside:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in inside:
                        del files[p]
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}")
            # Like the Hub, track new LFS paths in .gitattributes when no pattern covers them yet.
            if new_lfs_paths and attrs_path not in changed:
                attrs = self.store.read_file(rtype, repo_id, files[attrs_path]).decode() \
                    if attrs_path in files else ""
                pats = lfs_patterns(attrs)
                missing = [p for p in new_lfs_paths if not any(_attr_match(pt, p) for pt in pats)]
                if missing:
                    if attrs and not attrs.endswith("\n"):
                        attrs += "\n"
                    attrs += "".join(f"{p.replace(' ', '[[:space:]]')} filter=lfs diff=lfs merge=lfs -text\n"
                                     for p in missing)
                    data = attrs.encode()
                    files[attrs_path] = {"oid": self.store.put_blob(rtype, repo_id, data), "size": len(data),
                                         "lfs": None}
                    changed.add(attrs_path)
            new_sha = self.store.new_commit(rtype, repo_id, sha, files, changed, header["summary"],
                                            header.get("description") or "", user)
            pr_url = None
            if create_pr:
                n = 1 + max([int(r.split("/")[-1]) for r in refs if r.startswith("refs/pr/")] or [0])
                refs[f"refs/pr/{n}"] = new_sha
                pr_url = f"{self._base_url()}/{URL_PREFIX[rtype]}{repo_id}/discussions/{n}"
            else:
                refs[ref] = new_sha
            self.store.save_refs(rtype, repo_id, refs)
        out = {"success": True, "commitOid": new_sha, "hookOutput": "",
               "commitUrl": f"{self._base_url()}/{URL_PREFIX[rtype]}{repo_id}/commit/{new_sha}"}
        if pr_url:
            out["pullRequestUrl"] = pr_url
        self._send_json(out)

    @staticmethod
    def _parse_commit_body(raw: bytes) -> list[dict]:
        text = raw.decode("utf-8")
        stripped = text.strip()
        if stripped.startswith("{") and "\n" not in stripped:  # a single JSON object: the older JSON commit API
            obj = json.loads(stripped)
            if "key" in obj:
                return [obj]
            ops = [{"key": "header", "value": {"summary": obj.get("summary"), "description": obj.get("description")}}]
            ops += [{"key": "file", "value": f} for f in obj.get("files", [])]
            ops += [{"key": "lfsFile", "value": f} for f in obj.get("lfsFiles", [])]
            ops += [{"key": "deletedFile", "value": f} for f in obj.get("deletedFiles", [])]
            return ops
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError:
            raise HubError(400, "Invalid ndjson commit payload") from None

    # download -----------------------------------------------------------------------------------------------------

    def _resolve(self, rtype: str, repo_id: str, rev: str, path: str, raw: bool = False) -> None:
        """HEAD/GET /{repo}/resolve/{rev}/{path} (file_download.py:get_hf_file_metadata, http_get): X-Repo-Commit,
        ETag (git blob sha1; for LFS files the sha256, also in X-Linked-Etag, with X-Linked-Size), Content-Length,
        Accept-Ranges, Range -> 206. With HubServer.lfs_cdn_host set, LFS files answer 302 to a signed URL on that
        host (a different origin, like the Hub's CDN: the client stops there and drops Authorization)."""
        self._kind = "resolve" if not raw else "raw"
        self._repo(rtype, repo_id)
        with self.store.lock:
            sha, _, files = self._files_at(rtype, repo_id, rev)
        entry = files.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
        name = path.rsplit("/", 1)[-1]
        headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes", "Vary": "Origin, Accept",
                   "Content-Disposition": f"inline; filename*=UTF-8''{quote(name)}; filename=\"{name}\";"}
        lfs = entry.get("lfs")
        if lfs and not raw:
            oid = lfs["oid"]
            headers.update({"ETag": f'"{oid}"', "X-Linked-Etag": f'"{oid}"', "X-Linked-Size": str(lfs["size"])})
            if self.hub.lfs_cdn_host:
                loc = self._signed_cdn_url(rtype, repo_id, oid, path, host=self.hub.lfs_cdn_host)
                headers["Location"] = loc
                return self._send(302, b"", headers, content_type="text/plain; charset=utf-8")
            src = self.store.lfs_path(rtype, repo_id, oid)
            return self._serve_file(functools.partial(open, src, "rb"), lfs["size"], headers, "application/octet-stream",
                                    repo_id, path)
        if lfs and raw:
            data = lfs_pointer(lfs["oid"], lfs["size"])
        else:
            data = self.store.blob_path(rtype, repo_id, entry["oid"]).read_bytes()
        headers["ETag"] = f'"{entry["oid"]}"'
        ctype = "application/octet-stream" if _is_binary(data[:512]) else "text/plain; charset=utf-8"
        self._serve_file(lambda: io.BytesIO(data), len(data), headers, ctype, repo_id, path)

    def _lfs_cdn(self, method: str, segs: list[str]) -> None:
        """GET /lfs-cdn/{type}s/{ns}/{name}/{oid}?path=&exp=&sig= : the 'CDN' a 302 points to; no auth needed."""
        self._kind = "cdn"
        if len(segs) != 4 or segs[0][:-1] not in URL_PREFIX or not SHA256_RE.match(segs[3]) or \
                method not in ("GET", "HEAD"):
            raise HubError(404, "No such object URL")
        rtype, repo_id, oid = segs[0][:-1], f"{segs[1]}/{segs[2]}", segs[3]
        self._check_signature("download", rtype, repo_id, oid)
        size = self.store.lfs_size(rtype, repo_id, oid)
        if size is None:
            raise HubError(404, "Object does not exist")
        src = self.store.lfs_path(rtype, repo_id, oid)
        path = (self._query.get("path") or [""])[0]
        self._serve_file(functools.partial(open, src, "rb"), size, {"ETag": f'"{oid}"', "Accept-Ranges": "bytes"},
                         "application/octet-stream", repo_id, path)

    def _serve_file(self, opener: Callable[[], Any], size: int, headers: dict[str, str], ctype: str,
                    repo_id: str, path: str) -> None:
        """200 or 206 (single Range: bytes=a-b, a-, -n) or 416; fault knobs corrupt/truncate/drop the GET body."""
        corrupt = self.hub.faults.corruption(repo_id, path) if self.command == "GET" else None
        eff_size = size // 2 if corrupt and corrupt["mode"] == "truncate" else size
        start, end, status = 0, eff_size - 1, 200
        rng = self.headers.get("Range")
        if rng and "," not in rng:
            m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", rng)
            if m and (m.group(1) or m.group(2)):
                a, b = m.group(1), m.group(2)
                if a:
                    start, end = int(a), min(int(b), eff_size - 1) if b else eff_size - 1
                else:
                    start, end = max(eff_size - int(b), 0), eff_size - 1
                if start >= eff_size or start > end:
                    return self._send(416, b"", {**headers, "Content-Range": f"bytes */{eff_size}"}, ctype)
                status = 206
                headers = {**headers, "Content-Range": f"bytes {start}-{end}/{eff_size}"}
        length = max(end - start + 1, 0)
        self._drain()
        self.send_response(status)
        for k, v in {**headers, "Content-Type": ctype, "Content-Length": str(length),
                     "X-Request-Id": self._request_id}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        drop_after = self.hub.faults.take_download_drop(repo_id, path)
        flip_at = None
        if corrupt and corrupt["mode"] == "flip":
            flip_at = corrupt["offset"] if corrupt["offset"] is not None else size // 2
        sent = 0
        with opener() as fh:
            fh.seek(start)
            while sent < length:
                n = min(CHUNK, length - sent)
                if drop_after is not None:
                    n = min(n, drop_after - sent)
                    if n <= 0:
                        self.wfile.flush()
                        raise _Dropped()
                data = fh.read(n)
                if not data:
                    raise _Dropped()
                if flip_at is not None and start + sent <= flip_at < start + sent + len(data):
                    i = flip_at - start - sent
                    data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
                self.wfile.write(data)
                sent += len(data)
                self._bytes_out += len(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], hub: HubServer):
        self.hub = hub
        self.live: set[socket.socket] = set()
        self.live_lock = threading.Lock()
        super().__init__(addr, _Handler)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self.live_lock:
            self.live.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.live_lock:
                self.live.discard(request)

    def close_live(self) -> None:
        with self.live_lock:
            for s in list(self.live):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class HubServer:
    """The server, for tests. `start()` serves from a background thread (port 0 = a free port), `stop()` ends it.

    Knobs (settable at runtime, from the test's thread):
      - `drop_lfs_put(nth=1, times=1, mode=...)`: the nth LFS PUT from now (counting single PUTs and multipart
        parts), and the `times - 1` after it, lose their connection. mode "mid_body" closes after reading half the
        body, "before_response" after reading it all (nothing stored), "after_store" after storing the object
        (the response is what is lost).
      - `fail_next_commit(status=500, message=..., times=1)`: the next commit POST(s) answer `status` with a JSON
        error body (the client does not retry commits).
      - `corrupt_download(path, mode="flip"|"truncate", offset=None, repo_id=None)`: GETs of that file serve one
        flipped byte (same size: only a hash check notices) or the first half only (the client's size check fails).
      - `drop_download(path, after_bytes=0, times=1)`: the next GET(s) of that file close after `after_bytes`.
      - `clear_faults()`.
      - attributes: `tree_page_size` (None = the Hub's 1000/50), `lfs_threshold` (bytes above which preupload
        says lfs, 10 MiB), `multipart_chunk_size` (None = single PUT; else the batch answers multipart for larger
        objects), `lfs_cdn_host` (None = serve LFS bytes from resolve; e.g. "localhost" = 302 to that host),
        `lfs_verify` (offer the verify action, default True).
    `requests` is the list of logged requests (dicts: method, path, status, bytes_in, bytes_out, kind, dropped,
    authorization (bool), time); `count(kind, ...)` counts them.
    """

    def __init__(self, root: str | Path, token: str | None = None, port: int = 0, host: str = "127.0.0.1",
                 user: str = "mm-test", log_stderr: bool = True):
        self.root = Path(root)
        self.store = Store(self.root)
        self.token, self.user, self.host = token, user, host
        self.port = port
        self.log_stderr = log_stderr
        self.faults = Faults()
        self.requests: list[dict] = []
        self._log_lock = threading.Lock()
        self.tree_page_size: int | None = None
        self.lfs_threshold = LFS_SIZE_THRESHOLD
        self.multipart_chunk_size: int | None = None
        self.lfs_cdn_host: str | None = None
        self.lfs_verify = True
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # lifecycle
    def start(self) -> HubServer:
        self._httpd = _Server((self.host, self.port), self)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="hubserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.close_live()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def netloc(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.netloc}"

    # fault knobs
    def drop_lfs_put(self, nth: int = 1, times: int = 1, mode: str = "before_response") -> None:
        if mode not in ("mid_body", "before_response", "after_store"):
            raise ValueError(f"unknown mode {mode!r}")
        with self.faults.lock:
            first = self.faults.put_count + nth
            self.faults.put_drops.append({"first": first, "last": first + times - 1, "mode": mode})

    def fail_next_commit(self, status: int = 500, message: str = "hubserver: injected commit failure",
                         times: int = 1) -> None:
        with self.faults.lock:
            self.faults.commit_failures.extend({"status": status, "message": message} for _ in range(times))

    def corrupt_download(self, path: str, mode: str = "flip", offset: int | None = None,
                         repo_id: str | None = None) -> None:
        if mode not in ("flip", "truncate"):
            raise ValueError(f"unknown mode {mode!r}")
        with self.faults.lock:
            self.faults.corrupt[path] = {"mode": mode, "offset": offset, "repo_id": repo_id}

    def drop_download(self, path: str, after_bytes: int = 0, times: int = 1, repo_id: str | None = None) -> None:
        with self.faults.lock:
            self.faults.download_drops[path] = {"after_bytes": after_bytes, "times": times, "repo_id": repo_id}

    def clear_faults(self) -> None:
        with self.faults.lock:
            self.faults.put_drops.clear()
            self.faults.commit_failures.clear()
            self.faults.corrupt.clear()
            self.faults.download_drops.clear()

    # request log
    def _log(self, method: str, path: str, status: int | None, bytes_in: int, bytes_out: int, kind: str,
             dropped: bool, headers: dict[str, str]) -> None:
        rec = {"time": now_iso(), "method": method, "path": path, "status": status if not dropped else None,
               "bytes_in": bytes_in, "bytes_out": bytes_out, "kind": kind, "dropped": dropped,
               "authorization": any(k.lower() == "authorization" for k in headers),
               "range": next((v for k, v in headers.items() if k.lower() == "range"), None)}
        line = (f"{rec['time']} {method} {path} {'DROPPED' if dropped else status} "
                f"in={bytes_in} out={bytes_out} kind={kind}")
        with self._log_lock:
            self.requests.append(rec)
            with open(self.root / "requests.log", "a") as fh:
                fh.write(line + "\n")
            if self.log_stderr:
                print(f"hubserver: {line}", file=sys.stderr, flush=True)

    def count(self, kind: str | None = None, method: str | None = None, status: int | None = None,
              dropped: bool | None = None) -> int:
        with self._log_lock:
            return sum(1 for r in self.requests
                       if (kind is None or r["kind"] == kind) and (method is None or r["method"] == method)
                       and (status is None or r["status"] == status) and (dropped is None or r["dropped"] == dropped))

    def clear_requests(self) -> None:
        with self._log_lock:
            self.requests.clear()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tests.hubserver",
        description="Local Hugging Face Hub look-alike for tests (uploads and downloads, no Xet). Point the client "
                    "at it with HF_ENDPOINT=http://HOST:PORT HF_HUB_DISABLE_XET=1.")
    p.add_argument("--port", type=int, default=8765, help="port to listen on (0 = a free port; default 8765)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--root", required=True, help="folder holding repos, commits, LFS objects and requests.log")
    p.add_argument("--token", default=None, help="if set, writes and private reads need 'Authorization: Bearer TOKEN'")
    p.add_argument("--user", default="mm-test", help="the user whoami-v2 reports and repos default to")
    p.add_argument("--lfs-threshold", type=int, default=LFS_SIZE_THRESHOLD,
                   help="preupload sends files larger than this (bytes) to LFS (default 10 MiB)")
    p.add_argument("--multipart-chunk-size", type=int, default=None,
                   help="answer LFS uploads larger than this with multipart (default: single PUT)")
    p.add_argument("--quiet", action="store_true", help="log requests to ROOT/requests.log only, not stderr")
    args = p.parse_args(argv)
    hub = HubServer(args.root, token=args.token, port=args.port, host=args.host, user=args.user,
                    log_stderr=not args.quiet)
    hub.lfs_threshold = args.lfs_threshold
    hub.multipart_chunk_size = args.multipart_chunk_size
    hub._httpd = _Server((hub.host, hub.port), hub)
    hub.port = hub._httpd.server_address[1]
    info = {"url": hub.url, "port": hub.port, "pid": os.getpid(), "root": str(hub.root)}
    _write_json(hub.root / "server.json", info)
    print(f"hubserver: listening on {hub.url} (root {hub.root})", file=sys.stderr, flush=True)
    try:
        hub._httpd.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        hub._httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
