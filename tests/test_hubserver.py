"""The real `huggingface_hub` client (2.4.0 in the test venv) against tests/hubserver.py.

How the client is pointed at the server (the robust way): every client step runs in a *subprocess* whose
environment is set before `huggingface_hub` is imported. `huggingface_hub.constants` reads HF_ENDPOINT,
HF_HUB_DISABLE_XET, HF_HOME/HF_HUB_CACHE, HF_HUB_DOWNLOAD_TIMEOUT, HF_HUB_ETAG_TIMEOUT, HF_HUB_OFFLINE,
HF_HUB_DISABLE_PROGRESS_BARS at import time, and derives more from them at import time too
(`constants.HUGGINGFACE_CO_URL_TEMPLATE`, `utils._http._HUB_ORIGINS`, used by `hf_hub_url` and by the redirect
rules of the HEAD call). Monkeypatching `os.environ` after the import changes nothing, and reloading `constants`
leaves those derived copies stale, so an in-process client would have to pass `endpoint=` everywhere and patch
`constants.HF_HUB_DISABLE_XET` (the only one read lazily, by `is_xet_available()`). A subprocess is also how
`mm-convert` itself runs. The server runs in the pytest process, so tests flip its fault knobs and count its
requests (`hub.requests`, `hub.count(kind=...)`) directly. Each subprocess prints one `RESULT:{json}` line.

`HUBTEST_NO_SLEEP=1` makes the subprocess's `time.sleep` a no-op, so the client's retry back-off (1, 2, 4, 8, 8 s
for an LFS PUT; 1 s before resuming a download) does not slow the tests down.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
import textwrap
import time
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.hubserver import HubServer, git_blob_sha1

REPO = Path(__file__).resolve().parents[1]
TOKEN = "hf_hubservertest0123456789"
USER = "mm-test"

PRELUDE = '''
import hashlib, json, os, sys, time
if os.environ.get("HUBTEST_NO_SLEEP"):
    time.sleep = lambda s: None  # the client's retry back-off, not the test's business
from pathlib import Path
from huggingface_hub import (HfApi, CommitOperationAdd, hf_hub_download, snapshot_download)
from huggingface_hub.errors import (HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError,
                                    EntryNotFoundError, RemoteEntryNotFoundError)
api = HfApi()

def result(**kw):
    print("RESULT:" + json.dumps(kw, default=str))

def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()

def err(fn, *a, **kw):
    """Call fn; return the exception's class name, status and message (None if it did not raise)."""
    try:
        fn(*a, **kw)
    except Exception as e:  # noqa: BLE001
        resp = getattr(e, "response", None)
        chain, c = [], e
        while c is not None:
            chain.append(type(c).__name__)
            c = c.__cause__ or c.__context__
        return {"type": type(e).__name__, "status": getattr(resp, "status_code", None), "message": str(e),
                "chain": chain, "server_message": getattr(e, "server_message", None)}
    return None

def tree(repo, **kw):
    out = {}
    for e in api.list_repo_tree(repo, recursive=True, **kw):
        if hasattr(e, "size"):
            out[e.path] = {"size": e.size, "blob_id": e.blob_id, "sha256": e.lfs.sha256 if e.lfs else None,
                           "last_commit": e.last_commit.oid if e.last_commit else None}
    return out
'''


def client_env(url: str, home: Path, token: str | None = TOKEN, no_sleep: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=url, HF_HUB_DISABLE_XET="1", HF_HOME=str(home), HF_HUB_DISABLE_PROGRESS_BARS="1",
               HF_HUB_DISABLE_UPDATE_CHECK="1", PYTHONWARNINGS="ignore::DeprecationWarning")
    if token:
        env["HF_TOKEN"] = token
    if no_sleep:
        env["HUBTEST_NO_SLEEP"] = "1"
    return env


def run_client(url: str, workdir: Path, code: str, token: str | None = TOKEN, no_sleep: bool = False,
               timeout: float = 60) -> dict:
    """Run PRELUDE + code in a fresh interpreter against `url`; return the dict it passed to result()."""
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], cwd=workdir,
                          env=client_env(url, workdir / "hf-home", token, no_sleep),
                          capture_output=True, text=True, timeout=timeout, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT:")]
    assert proc.returncode == 0 and lines, f"client failed ({proc.returncode})\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1][len("RESULT:"):])


@pytest.fixture
def hub(tmp_path):
    with HubServer(tmp_path / "hub-root", token=TOKEN, user=USER) as server:
        yield server


@pytest.fixture
def sample(tmp_path) -> Path:
    """A folder with files the Hub keeps in git (small text) and in LFS (by .gitattributes pattern, by binary
    content, by size above the server's lfs_threshold, set to 64 KiB by the tests that use big.txt)."""
    root = tmp_path / "sample"
    (root / "sub").mkdir(parents=True)
    rnd = hashlib.sha256(b"seed").digest()
    blob = b"".join(hashlib.sha256(rnd + i.to_bytes(4, "little")).digest() for i in range(8000))  # 256000 bytes
    (root / "config.json").write_text(json.dumps({"model_type": "minimax_m2", "hidden_size": 64}) + "\n")
    (root / "README.md").write_text("---\nlicense: mit\nlibrary_name: transformers\n---\n# tiny\n")
    (root / "model.safetensors").write_bytes(blob[:200_000])  # LFS: *.safetensors in .gitattributes
    (root / "sub" / "weights.dat").write_bytes(b"\x00\x01" + blob[:30_000])  # LFS: binary sample
    (root / "sub" / "notes.txt").write_text("plain text stays in git\n")
    (root / "big.txt").write_text("0123456789abcdef\n" * 6000)  # 102000 bytes of text: LFS above 64 KiB
    return root


LFS_FILES = {"model.safetensors", "sub/weights.dat", "big.txt"}


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def wire(url: str, method: str, path: str, headers: dict[str, str] | None = None,
         body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP request (no huggingface_hub), for protocol-level checks."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


AUTH = {"Authorization": f"Bearer {TOKEN}"}

# The suite targets the installed client (2.4.0). Behaviour that older 1.x clients lack is skipped there, so the
# server can also be checked against a 1.x venv (`--noconftest`): see docs/HUBSERVER.md, "client versions".
CLIENT = tuple(int(x) for x in version("huggingface_hub").split(".")[:2])


def needs(v: tuple[int, int], why: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(CLIENT < v, reason=f"huggingface_hub < {v[0]}.{v[1]}: {why}")

UPLOAD_SAMPLE = '''
repo = f"{USER}/demo"
api.create_repo(repo, exist_ok=True)
ci = api.upload_folder(folder_path=SAMPLE, repo_id=repo)
'''


def upload_code(sample: Path, extra: str = "") -> str:
    return f"USER = {USER!r}\nSAMPLE = {str(sample)!r}\n" + UPLOAD_SAMPLE + textwrap.dedent(extra)


# -- the command line -----------------------------------------------------------------------------------------------


def test_cli_help():
    proc = subprocess.run([sys.executable, "-m", "tests.hubserver", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--port", "--root", "--token"):
        assert flag in proc.stdout


def _start_cli(root: Path) -> tuple[subprocess.Popen, str]:
    (root / "server.json").unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "tests.hubserver", "--port", "0", "--root", str(root),
                             "--token", TOKEN, "--quiet"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    for _ in range(100):
        if (root / "server.json").exists():
            return proc, json.loads((root / "server.json").read_text())["url"]
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"server did not start: {proc.stderr.read() if proc.stderr else ''}")


def test_cli_server_keeps_state_across_restart(tmp_path):
    root = tmp_path / "cli-root"
    proc, url = _start_cli(root)
    try:
        first = run_client(url, tmp_path / "c1", f'''
            api.create_repo("{USER}/persist", private=True)
            ci = api.upload_file(path_or_fileobj=b"weights" * 1000, path_in_repo="w.safetensors",
                                 repo_id="{USER}/persist")
            result(oid=ci.oid)
        ''')
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    log = (root / "requests.log").read_text().splitlines()
    assert any(" PUT /lfs-upload/models/mm-test/persist/" in ln and " 200 " in ln for ln in log)
    assert any(" POST /api/models/mm-test/persist/commit/main 200 " in ln for ln in log)

    proc, url2 = _start_cli(root)  # a new process, maybe a new port: same repos
    try:
        second = run_client(url2, tmp_path / "c2", f'''
            info = api.model_info("{USER}/persist", files_metadata=True)
            p = hf_hub_download("{USER}/persist", "w.safetensors")
            result(sha=info.sha, private=info.private, files=sorted(s.rfilename for s in info.siblings),
                   ok=Path(p).read_bytes() == b"weights" * 1000)
        ''')
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert second == {"sha": first["oid"], "private": True, "files": [".gitattributes", "w.safetensors"],
                      "ok": True}


# -- repos, errors, auth ----------------------------------------------------------------------------------------------


def test_create_repo_info_and_error_mapping(hub, tmp_path):
    r = run_client(hub.url, tmp_path, f'''
        out = {{}}
        url = api.create_repo("m1")
        out["url"] = [url.repo_id, url.repo_type, url.endpoint]
        out["again"] = err(api.create_repo, "m1")
        out["exist_ok"] = str(api.create_repo("m1", exist_ok=True))
        api.create_repo("{USER}/secret", private=True)
        api.create_repo("{USER}/data", repo_type="dataset")
        info = api.repo_info("{USER}/m1")
        out["info"] = [info.id, info.private, [s.rfilename for s in info.siblings], info.sha]
        only = api.model_info("{USER}/m1", expand=["sha", "private"])
        out["expand"] = [only.sha == info.sha, only.private, only.siblings]
        out["dataset"] = api.repo_info("{USER}/data", repo_type="dataset").id
        out["commits"] = [c.title for c in api.list_repo_commits("{USER}/m1")]
        out["whoami"] = api.whoami()["name"]
        out["exists"] = [api.repo_exists("{USER}/m1"), api.repo_exists("{USER}/nope")]
        out["no_repo"] = err(api.repo_info, "{USER}/nope")
        out["no_rev"] = err(api.repo_info, "{USER}/m1", revision="v9")
        out["no_file"] = err(hf_hub_download, "{USER}/m1", "missing.json")
        out["private_anon"] = err(api.repo_info, "{USER}/secret", token=False)
        out["private_ok"] = api.repo_info("{USER}/secret").private
        out["bad_token"] = err(api.repo_info, "{USER}/m1", token="hf_wrong")
        out["write_anon"] = err(api.upload_file, path_or_fileobj=b"x", path_in_repo="x.txt",
                                repo_id="{USER}/m1", token=False)
        out["read_anon"] = api.repo_info("{USER}/m1", token=False).id
        api.delete_repo("{USER}/data", repo_type="dataset")
        out["deleted"] = [api.repo_exists("{USER}/data", repo_type="dataset"),
                          err(api.delete_repo, "{USER}/data", repo_type="dataset"),
                          err(api.delete_repo, "{USER}/data", repo_type="dataset", missing_ok=True)]
        result(**out)
    ''')
    assert r["url"] == [f"{USER}/m1", "model", hub.url]
    assert (r["again"]["type"], r["again"]["status"]) == ("HfHubHTTPError", 409)
    assert r["exist_ok"] == f"{hub.url}/{USER}/m1"
    assert r["info"][:3] == [f"{USER}/m1", False, [".gitattributes"]] and len(r["info"][3]) == 40
    assert r["expand"] == [True, False, None]  # expand: only the requested properties come back
    assert r["dataset"] == f"{USER}/data"
    assert r["commits"] == ["initial commit"]
    assert r["whoami"] == USER
    assert r["exists"] == [True, False]
    assert (r["no_repo"]["type"], r["no_repo"]["status"]) == ("RepositoryNotFoundError", 404)
    assert (r["no_rev"]["type"], r["no_rev"]["status"]) == ("RevisionNotFoundError", 404)
    assert r["no_file"]["type"] == "RemoteEntryNotFoundError"
    assert (r["private_anon"]["type"], r["private_anon"]["status"]) == ("RepositoryNotFoundError", 401)
    assert r["private_ok"] is True
    assert (r["bad_token"]["type"], r["bad_token"]["status"]) == ("HfHubHTTPError", 401)
    assert "Invalid credentials" in r["bad_token"]["message"]
    assert r["write_anon"]["status"] == 401
    assert r["read_anon"] == f"{USER}/m1"
    assert r["deleted"][0] is False and r["deleted"][1]["type"] == "RepositoryNotFoundError"
    assert r["deleted"][2] is None


# -- upload ------------------------------------------------------------------------------------------------------


def test_upload_folder_then_identical_reupload_uploads_nothing(hub, sample, tmp_path):
    hub.lfs_threshold = 64 * 1024
    first = run_client(hub.url, tmp_path / "c1", upload_code(sample, '''
        result(oid=ci.oid, url=ci.commit_url, tree=tree(repo, expand=True))
    '''))
    files = local_files(sample)
    assert hub.count(kind="preupload") == 1 and hub.count(kind="lfs-batch") == 1
    assert hub.count(kind="lfs-put", status=200) == len(LFS_FILES)
    assert hub.count(kind="lfs-verify", status=200) == len(LFS_FILES)
    assert hub.count(kind="commit", status=200) == 1
    assert first["url"] == f"{hub.url}/{USER}/demo/commit/{first['oid']}"
    tree = first["tree"]
    assert set(tree) == set(files) | {".gitattributes"}
    for path, data in files.items():
        t = tree[path]
        assert t["size"] == len(data), path
        assert t["last_commit"] == first["oid"]
        if path in LFS_FILES:
            assert t["sha256"] == hashlib.sha256(data).hexdigest(), path
        else:
            assert t["sha256"] is None and t["blob_id"] == git_blob_sha1(data), path
    assert not any("xet" in r["path"].lower() for r in hub.requests)

    # The same folder again: preupload reports every oid unchanged, the LFS batch has nothing to upload, and the
    # client skips the empty commit ("No files have been modified since last commit").
    second = run_client(hub.url, tmp_path / "c2", upload_code(sample, '''
        result(oid=ci.oid)
    '''))
    assert second["oid"] == first["oid"]
    assert hub.count(kind="lfs-put") == len(LFS_FILES)
    assert hub.count(kind="commit") == 1

    # Known LFS content under a new path: no PUT (the batch answers without actions), one commit.
    third = run_client(hub.url, tmp_path / "c3", f'''
        ci = api.upload_file(path_or_fileobj={str(sample / "model.safetensors")!r}, path_in_repo="copy.safetensors",
                             repo_id="{USER}/demo")
        result(oid=ci.oid, tree=tree("{USER}/demo"))
    ''')
    assert hub.count(kind="lfs-put") == len(LFS_FILES)
    assert hub.count(kind="commit", status=200) == 2
    assert third["tree"]["copy.safetensors"]["sha256"] == tree["model.safetensors"]["sha256"]


def test_preupload_lfs_files_then_create_commit(hub, tmp_path):
    shard = tmp_path / "shard-2.safetensors"
    shard.write_bytes(os.urandom(70_000))
    r = run_client(hub.url, tmp_path, f'''
        repo = "{USER}/shards"
        api.create_repo(repo)
        initial = api.repo_info(repo).sha
        ops = [CommitOperationAdd(path_in_repo="shard-1.safetensors", path_or_fileobj=b"\\x01" * 50_000),
               CommitOperationAdd(path_in_repo="shard-2.safetensors", path_or_fileobj={str(shard)!r}),
               CommitOperationAdd(path_in_repo="config.json", path_or_fileobj=b'{{"a": 1}}')]
        api.preupload_lfs_files(repo, additions=ops)
        modes = [op._upload_mode for op in ops]
        print("PREUPLOADED", flush=True)
        info = api.create_commit(repo, operations=ops, commit_message="two shards and a config")
        head = api.repo_info(repo).sha
        stale = err(api.create_commit, repo, commit_message="stale parent", parent_commit=initial,
                    operations=[CommitOperationAdd(path_in_repo="late.txt", path_or_fileobj=b"late")])
        result(modes=modes, oid=info.oid, head=head, url=info.commit_url, tree=tree(repo),
               titles=[c.title for c in api.list_repo_commits(repo)], stale=stale)
    ''')
    assert r["modes"] == ["lfs", "lfs", "regular"]
    assert r["oid"] == r["head"] and r["url"].endswith(f"/{USER}/shards/commit/{r['oid']}")
    assert hub.count(kind="lfs-put", status=200) == 2  # during preupload_lfs_files; create_commit adds none
    assert hub.count(kind="commit", status=200) == 1
    assert r["tree"]["shard-1.safetensors"]["sha256"] == hashlib.sha256(b"\x01" * 50_000).hexdigest()
    assert r["tree"]["shard-2.safetensors"]["sha256"] == hashlib.sha256(shard.read_bytes()).hexdigest()
    assert r["tree"]["config.json"]["sha256"] is None
    assert r["titles"] == ["two shards and a config", "initial commit"]
    assert r["stale"]["status"] == 412  # parent_commit no longer the head of the branch


def test_branch_pull_request_and_revisions(hub, tmp_path):
    r = run_client(hub.url, tmp_path, f'''
        repo = "{USER}/revs"
        api.create_repo(repo)
        api.create_branch(repo, branch="dev")
        api.create_branch(repo, branch="dev", exist_ok=True)
        dev = api.upload_file(path_or_fileobj=b"dev", path_in_repo="f.txt", repo_id=repo, revision="dev")
        pr = api.create_commit(repo, operations=[CommitOperationAdd(path_in_repo="f.txt", path_or_fileobj=b"pr")],
                               commit_message="proposal", create_pr=True)
        refs = api.list_repo_refs(repo, include_pull_requests=True)
        read = lambda rev: Path(hf_hub_download(repo, "f.txt", revision=rev)).read_bytes().decode()
        result(branches=sorted(b.name for b in refs.branches), prs=[p.ref for p in refs.pull_requests],
               pr_revision=pr.pr_revision, dev=read("dev"), by_sha=read(dev.oid), by_short=read(dev.oid[:10]),
               pr=read("refs/pr/1"), main=err(hf_hub_download, repo, "f.txt"))
    ''')
    assert r["branches"] == ["dev", "main"] and r["prs"] == ["refs/pr/1"] and r["pr_revision"] == "refs/pr/1"
    assert (r["dev"], r["by_sha"], r["by_short"], r["pr"]) == ("dev", "dev", "dev", "pr")
    assert r["main"]["type"] == "RemoteEntryNotFoundError"


def test_copy_and_delete_operations(hub, tmp_path):
    """CommitOperationCopy sends an lfsFile line without size for LFS sources (the server copies the pointer) and
    re-uploads regular files; CommitOperationDelete sends deletedFile / deletedFolder."""
    r = run_client(hub.url, tmp_path, f'''
        from huggingface_hub import CommitOperationCopy, CommitOperationDelete
        repo = "{USER}/ops"
        api.create_repo(repo)
        api.create_commit(repo, commit_message="add", operations=[
            CommitOperationAdd(path_in_repo="a/w.safetensors", path_or_fileobj=b"\\x03" * 30_000),
            CommitOperationAdd(path_in_repo="a/readme.txt", path_or_fileobj=b"hello"),
            CommitOperationAdd(path_in_repo="b/x.txt", path_or_fileobj=b"x")])
        api.create_commit(repo, commit_message="rename and prune", operations=[
            CommitOperationCopy(src_path_in_repo="a/w.safetensors", path_in_repo="c/w.safetensors"),
            CommitOperationCopy(src_path_in_repo="a/readme.txt", path_in_repo="c/readme.txt"),
            CommitOperationDelete(path_in_repo="a/"),
            CommitOperationDelete(path_in_repo="b/x.txt")])
        missing = err(api.delete_file, "nope.txt", repo)
        result(tree=tree(repo), missing=missing)
    ''')
    assert sorted(r["tree"]) == [".gitattributes", "c/readme.txt", "c/w.safetensors"]
    assert r["tree"]["c/w.safetensors"]["sha256"] == hashlib.sha256(b"\x03" * 30_000).hexdigest()
    assert r["missing"]["type"] in ("RemoteEntryNotFoundError", "EntryNotFoundError") and r["missing"]["status"] == 404
    assert hub.count(kind="lfs-put") == 1  # the copy moved no bytes
    assert hub.count(kind="paths-info") >= 1


# -- download ----------------------------------------------------------------------------------------------------


def test_download_round_trip(hub, sample, tmp_path):
    hub.lfs_threshold = 64 * 1024
    r = run_client(hub.url, tmp_path, upload_code(sample, '''
        got = {}
        for f in api.list_repo_files(repo):
            got[f] = sha256(hf_hub_download(repo, f))
        blobs = sorted(p.name for p in (Path(os.environ["HF_HOME"]) / "hub" / "models--mm-test--demo" / "blobs").iterdir())
        pinned = sha256(hf_hub_download(repo, "model.safetensors", revision=ci.oid))
        part = snapshot_download(repo, allow_patterns=["*.safetensors", "sub/*"], max_workers=2, cache_dir="other-cache")
        part_files = sorted(p.relative_to(part).as_posix() for p in Path(part).rglob("*") if p.is_file())
        full = snapshot_download(repo, local_dir="full", max_workers=4)
        full_files = {p.relative_to(full).as_posix(): sha256(p) for p in Path(full).rglob("*")
                      if p.is_file() and ".cache" not in p.parts}
        check = api.verify_repo_checksums(repo, local_dir="full") if hasattr(api, "verify_repo_checksums") else None
        result(got=got, blobs=blobs, pinned=pinned, part=part_files, full=full_files, oid=ci.oid,
               mismatches=check and check.mismatches, checked=check and check.checked_count)
    '''))
    files = {p: hashlib.sha256(d).hexdigest() for p, d in local_files(sample).items()}
    assert {p: h for p, h in r["got"].items() if p != ".gitattributes"} == files
    assert r["pinned"] == files["model.safetensors"]
    assert r["part"] == ["model.safetensors", "sub/notes.txt", "sub/weights.dat"]
    assert {p: h for p, h in r["full"].items() if p != ".gitattributes"} == files
    # The cache names LFS blobs by sha256 and git blobs by git sha1, as with the real Hub.
    data = local_files(sample)
    expected_blobs = {hashlib.sha256(data[p]).hexdigest() if p in LFS_FILES else git_blob_sha1(data[p])
                      for p in data}
    assert expected_blobs <= set(r["blobs"])
    if CLIENT >= (1, 1):  # HfApi.verify_repo_checksums: sha256 for LFS files, git sha1 for the others
        assert r["mismatches"] == [] and r["checked"] == len(data) + 1


def test_resolve_headers_and_range_requests(hub, sample, tmp_path):
    r = run_client(hub.url, tmp_path, upload_code(sample, 'result(oid=ci.oid)'))
    oid = r["oid"]
    data = (sample / "model.safetensors").read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    base = f"/{USER}/demo/resolve/main"

    status, h, body = wire(hub.url, "HEAD", f"{base}/model.safetensors", AUTH)
    assert status == 200 and body == b""
    assert h["x-repo-commit"] == oid
    assert h["etag"] == h["x-linked-etag"] == f'"{sha}"'
    assert h["x-linked-size"] == h["content-length"] == str(len(data))
    assert h["accept-ranges"] == "bytes"
    assert not any(k.startswith("x-xet") for k in h) and "link" not in h  # never advertise Xet

    status, h, body = wire(hub.url, "HEAD", f"{base}/config.json", AUTH)
    cfg = (sample / "config.json").read_bytes()
    assert status == 200 and h["etag"] == f'"{git_blob_sha1(cfg)}"' and "x-linked-etag" not in h

    status, h, body = wire(hub.url, "GET", f"{base}/model.safetensors", {**AUTH, "Range": "bytes=10-19"})
    assert (status, body, h["content-range"]) == (206, data[10:20], f"bytes 10-19/{len(data)}")
    status, h, body = wire(hub.url, "GET", f"{base}/model.safetensors", {**AUTH, "Range": "bytes=-5"})
    assert (status, body) == (206, data[-5:])
    status, h, body = wire(hub.url, "GET", f"/{USER}/demo/resolve/{oid}/model.safetensors",
                           {**AUTH, "Range": f"bytes={len(data) - 3}-"})
    assert (status, body) == (206, data[-3:])
    status, h, _ = wire(hub.url, "GET", f"{base}/model.safetensors", {**AUTH, "Range": f"bytes={len(data)}-"})
    assert status == 416 and h["content-range"] == f"bytes */{len(data)}"

    status, h, _ = wire(hub.url, "HEAD", f"/{USER}/demo/resolve/nope/config.json", AUTH)
    assert (status, h["x-error-code"]) == (404, "RevisionNotFound")
    status, h, _ = wire(hub.url, "HEAD", f"{base}/nope.json", AUTH)
    assert (status, h["x-error-code"], h["x-repo-commit"]) == (404, "EntryNotFound", oid)
    status, h, _ = wire(hub.url, "HEAD", f"/{USER}/nope/resolve/main/config.json", AUTH)
    assert (status, h["x-error-code"]) == (404, "RepoNotFound")

    status, _, body = wire(hub.url, "GET", f"/api/models/{USER}/demo/tree/main?recursive=true&expand=true", AUTH)
    entries = json.loads(body)
    lfs = next(e for e in entries if e["path"] == "model.safetensors")
    assert lfs["lfs"] == {"oid": sha, "size": len(data), "pointerSize": lfs["lfs"]["pointerSize"]}
    assert not any("xetHash" in e for e in entries)


def test_tree_listing_follows_link_pagination(hub, sample, tmp_path):
    hub.tree_page_size = 2
    r = run_client(hub.url, tmp_path, upload_code(sample, '''
        everything = [(type(e).__name__, e.path) for e in api.list_repo_tree(repo, recursive=True, expand=True)]
        top = sorted(e.path for e in api.list_repo_tree(repo))
        sub = sorted(e.path for e in api.list_repo_tree(repo, path_in_repo="sub"))
        info = api.get_paths_info(repo, ["sub", "config.json", "missing"])
        result(everything=everything, top=top, sub=sub, info=sorted((e.path, type(e).__name__) for e in info))
    '''))
    paths = [p for _, p in r["everything"]]
    assert sorted(paths) == sorted(set(local_files(sample)) | {".gitattributes", "sub"})
    assert ["RepoFolder", "sub"] in r["everything"]
    assert hub.count(kind="tree") > 4  # followed the Link: rel="next" pages
    assert r["top"] == [".gitattributes", "README.md", "big.txt", "config.json", "model.safetensors", "sub"]
    assert r["sub"] == ["sub/notes.txt", "sub/weights.dat"]
    assert r["info"] == [["config.json", "RepoFile"], ["sub", "RepoFolder"]]  # missing paths are left out


# -- faults ------------------------------------------------------------------------------------------------------


@needs((1, 21), "http_backoff does not retry httpx.RemoteProtocolError (server closed without a response)")
def test_dropped_lfs_put_is_retried_or_fails_then_rerun_succeeds(hub, tmp_path):
    payload = tmp_path / "w.safetensors"
    payload.write_bytes(os.urandom(120_000))
    # A single drop: the client's own backoff (http_backoff, 5 retries) re-sends the PUT and the upload succeeds.
    hub.drop_lfs_put(nth=1, times=1, mode="before_response")
    r = run_client(hub.url, tmp_path / "c1", f'''
        api.create_repo("{USER}/flaky")
        ci = api.upload_file(path_or_fileobj={str(payload)!r}, path_in_repo="a.safetensors", repo_id="{USER}/flaky")
        result(oid=ci.oid)
    ''', no_sleep=True)
    assert hub.count(kind="lfs-put", dropped=True) == 1 and hub.count(kind="lfs-put", status=200) == 1

    # Every attempt dropped (1 + 5 retries): the upload fails, nothing is committed; a rerun then succeeds.
    hub.drop_lfs_put(nth=1, times=6, mode="mid_body")
    r = run_client(hub.url, tmp_path / "c2", f'''
        repo = "{USER}/flaky"
        before = api.repo_info(repo).sha
        new = Path({str(payload)!r}).read_bytes() + b"x"  # content the server does not have yet
        failed = err(api.upload_file, path_or_fileobj=new, path_in_repo="b/a.safetensors", repo_id=repo)
        unchanged = api.repo_info(repo).sha == before
        ci = api.upload_file(path_or_fileobj=new, path_in_repo="b/a.safetensors", repo_id=repo)
        result(failed=failed, unchanged=unchanged, tree=tree(repo))
    ''', no_sleep=True)
    assert r["failed"]["type"] == "RuntimeError" and "Error while uploading" in r["failed"]["message"]
    assert {"RemoteProtocolError", "ReadError", "WriteError"} & set(r["failed"]["chain"]), r["failed"]["chain"]
    assert r["unchanged"] is True
    assert hub.count(kind="lfs-put", dropped=True) == 1 + 6
    assert hub.count(kind="lfs-put", status=200) == 2
    assert r["tree"]["b/a.safetensors"]["size"] == 120_001


def test_commit_500_raises_clear_error_then_retry_commits(hub, tmp_path):
    hub.fail_next_commit(status=500, message="injected: the commit store is down")
    r = run_client(hub.url, tmp_path, f'''
        repo = "{USER}/c500"
        api.create_repo(repo)
        ops = [CommitOperationAdd(path_in_repo="w.safetensors", path_or_fileobj=b"\\x02" * 40_000),
               CommitOperationAdd(path_in_repo="config.json", path_or_fileobj=b"{{}}")]
        failed = err(api.create_commit, repo, operations=ops, commit_message="first try")
        ci = api.create_commit(repo, operations=ops, commit_message="second try")
        result(failed=failed, oid=ci.oid, titles=[c.title for c in api.list_repo_commits(repo)])
    ''')
    f = r["failed"]
    assert (f["type"], f["status"]) == ("HfHubHTTPError", 500)
    assert "injected: the commit store is down" in f["message"]
    assert f["server_message"] == "injected: the commit store is down"
    assert hub.count(kind="commit", status=500) == 1 and hub.count(kind="commit", status=200) == 1
    assert hub.count(kind="lfs-put", status=200) == 1  # the retry found the object stored: no second PUT
    assert r["titles"] == ["second try", "initial commit"]


def test_wrong_bytes_on_download_are_only_caught_by_hashing(hub, sample, tmp_path):
    hub.corrupt_download("model.safetensors", mode="flip")
    r = run_client(hub.url, tmp_path, upload_code(sample, '''
        hub_sha = next(e.lfs.sha256 for e in api.list_repo_tree(repo) if e.path == "model.safetensors")
        p = hf_hub_download(repo, "model.safetensors", local_dir="dl")
        check = api.verify_repo_checksums(repo, local_dir="dl") if hasattr(api, "verify_repo_checksums") else None
        result(hub_sha=hub_sha, got=sha256(p), size=Path(p).stat().st_size, mismatches=check and check.mismatches)
    '''))
    data = (sample / "model.safetensors").read_bytes()
    assert r["hub_sha"] == hashlib.sha256(data).hexdigest()
    assert r["size"] == len(data) and r["got"] != r["hub_sha"]  # same size: hf_hub_download accepted it
    if CLIENT >= (1, 1):
        assert [m["path"] for m in r["mismatches"]] == ["model.safetensors"]

    hub.corrupt_download("model.safetensors", mode="truncate")
    r = run_client(hub.url, tmp_path / "c2", f'''
        result(e=err(hf_hub_download, "{USER}/demo", "model.safetensors", force_download=True))
    ''')
    assert r["e"]["type"] == "OSError" and "Consistency check failed" in r["e"]["message"]


@needs((1, 20), "http_get resumes on ConnectError/timeouts only, not on a connection closed mid-body")
def test_dropped_download_is_resumed_with_range(hub, tmp_path):
    """http_get keeps only whole DOWNLOAD_CHUNK_SIZE (10 MiB) chunks of an interrupted GET: a drop inside the first
    10 MiB restarts the file with a plain GET, a drop later resumes with `Range: bytes=<10 MiB * k>-`."""
    mib = 1024 * 1024
    data = os.urandom(11 * mib)
    (tmp_path / "big.safetensors").write_bytes(data)
    (tmp_path / "small.safetensors").write_bytes(data[:100_000])
    hub.drop_download("big.safetensors", after_bytes=10 * mib + 123)
    hub.drop_download("small.safetensors", after_bytes=50_000)
    r = run_client(hub.url, tmp_path, f'''
        api.create_repo("{USER}/dl")
        api.upload_folder(folder_path=".", repo_id="{USER}/dl", allow_patterns=["*.safetensors"])
        result(big=sha256(hf_hub_download("{USER}/dl", "big.safetensors")),
               small=sha256(hf_hub_download("{USER}/dl", "small.safetensors")))
    ''', no_sleep=True)
    assert r["big"] == hashlib.sha256(data).hexdigest()
    assert r["small"] == hashlib.sha256(data[:100_000]).hexdigest()
    big = [x for x in hub.requests if x["kind"] == "resolve" and x["method"] == "GET" and "big" in x["path"]]
    assert [(x["dropped"], x["status"], x["range"]) for x in big] == [(True, None, None),
                                                                     (False, 206, f"bytes={10 * mib}-")]
    small = [x for x in hub.requests if x["kind"] == "resolve" and x["method"] == "GET" and "small" in x["path"]]
    assert [(x["dropped"], x["status"], x["range"]) for x in small] == [(True, None, None), (False, 200, None)]


def test_multipart_upload_and_cdn_redirect_download(hub, tmp_path):
    hub.multipart_chunk_size = 64 * 1024
    hub.lfs_cdn_host = "localhost"  # another origin than 127.0.0.1: the client treats it as the Hub's CDN
    data = os.urandom(200_000)
    (tmp_path / "big.safetensors").write_bytes(data)
    r = run_client(hub.url, tmp_path, f'''
        api.create_repo("{USER}/mp")
        api.upload_file(path_or_fileobj="big.safetensors", path_in_repo="big.safetensors", repo_id="{USER}/mp")
        result(got=sha256(hf_hub_download("{USER}/mp", "big.safetensors")))
    ''')
    assert r["got"] == hashlib.sha256(data).hexdigest()
    assert hub.count(kind="lfs-part", status=200) == 4 and hub.count(kind="lfs-complete", status=200) == 1
    head = next(x for x in hub.requests if x["kind"] == "resolve" and x["method"] == "HEAD")
    cdn = [x for x in hub.requests if x["kind"] == "cdn"]
    assert head["status"] == 302 and head["authorization"]
    assert len(cdn) == 1 and cdn[0]["status"] == 200 and not cdn[0]["authorization"]  # auth not sent off-Hub


def test_lfs_protocol_checks_on_the_wire(hub):
    """Raw HTTP, no client: the PUT checks sha256 and size and needs its signature; a commit cannot point at an
    LFS object that was never uploaded; the batch answers stored objects without actions."""
    status, _, _ = wire(hub.url, "POST", "/api/repos/create", {**AUTH, "Content-Type": "application/json"},
                        json.dumps({"name": "wire", "organization": None}).encode())
    assert status == 200
    data = b"wire bytes" * 1000
    oid = hashlib.sha256(data).hexdigest()

    def batch() -> dict:
        req = {"operation": "upload", "transfers": ["basic", "multipart", "xet"], "hash_algo": "sha256",
               "objects": [{"oid": oid, "size": len(data)}], "ref": {"name": "main"}}
        status, _, body = wire(hub.url, "POST", f"/{USER}/wire.git/info/lfs/objects/batch",
                               {**AUTH, "Content-Type": "application/vnd.git-lfs+json"}, json.dumps(req).encode())
        assert status == 200
        out = json.loads(body)
        assert out["transfer"] == "basic"  # offered "xet": never chosen
        return out["objects"][0]

    def commit(op: dict) -> int:
        body = "\n".join(json.dumps(x) for x in ({"key": "header", "value": {"summary": "wire"}}, op)).encode()
        return wire(hub.url, "POST", f"/api/models/{USER}/wire/commit/main",
                    {**AUTH, "Content-Type": "application/x-ndjson"}, body)[0]

    lfs_op = {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": oid, "size": len(data)}}
    assert commit(lfs_op) == 400  # not uploaded yet
    href = urlsplit(batch()["actions"]["upload"]["href"])
    target = f"{href.path}?{href.query}"
    assert wire(hub.url, "PUT", href.path + "?size=1&exp=9999999999&sig=0", {}, data)[0] == 403
    assert wire(hub.url, "PUT", target, {}, data[:-1] + b"!")[0] == 400  # wrong bytes, same size
    assert wire(hub.url, "PUT", target, {}, data[:-1])[0] == 400  # wrong size
    assert "actions" in batch()
    assert wire(hub.url, "PUT", target, {}, data)[0] == 200  # no Authorization: the URL is signed
    assert "actions" not in batch()
    assert commit(lfs_op) == 200
    assert commit({"key": "deletedFile", "value": {"path": "nope.txt"}}) == 404
