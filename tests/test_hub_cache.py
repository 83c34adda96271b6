"""Sources read in place from the Hugging Face cache: one copy of the weights on disk, keyed by the
resolved commit, offline from the cache. The real huggingface_hub client against tests/hubserver.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mm_convert.read.hf_cache import snapshot_of
from tests.conftest import REPO
from tests.hubserver import HubServer
from tests.test_hub import TOKEN, USER, mm_convert

SOURCE_REPO = f"{USER}/src"


@pytest.fixture
def hub(tmp_path):
    with HubServer(tmp_path / "hub-root", token=TOKEN, user=USER, log_stderr=False) as server:
        yield server


def _hf(hub: HubServer, home: Path, code: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_TOKEN=TOKEN, HF_HOME=str(home),
               HF_HUB_DISABLE_UPDATE_CHECK="1", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", "from huggingface_hub import HfApi; api = HfApi()\n" + code],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr


def upload(hub: HubServer, tmp_path: Path, folder: Path, repo: str = SOURCE_REPO) -> None:
    _hf(hub, tmp_path / "uploader", f"api.create_repo({repo!r}, exist_ok=True)\n"
                                    f"api.upload_folder(repo_id={repo!r}, folder_path={str(folder)!r})")


def edit_readme_on_main(hub: HubServer, tmp_path: Path, text: str, repo: str = SOURCE_REPO) -> None:
    _hf(hub, tmp_path / "uploader", f"api.upload_file(repo_id={repo!r}, path_or_fileobj={text.encode()!r}, "
                                    "path_in_repo='README.md')")


def unique_file_bytes(*roots: Path) -> int:
    """Bytes on disk under `roots`, each inode counted once (links into blobs/ are not copies)."""
    seen, total = set(), 0
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file() and not p.is_symlink():
                st = p.stat()
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_size
    return total


def copies_of(content: bytes, *roots: Path) -> int:
    """How many distinct files (by inode) under `roots` hold exactly `content`."""
    seen = set()
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file() and not p.is_symlink() and p.stat().st_size == len(content) and p.read_bytes() == content:
                seen.add(p.stat().st_ino)
    return len(seen)


def tensor_files(out: Path) -> dict[str, bytes]:
    """Every output file but the two that record where the source came from (manifest, card)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*")
            if p.is_file() and ".mm-convert" not in p.parts and p.name not in ("mm_convert.json", "README.md")}


def shards(folder: Path) -> list[str]:
    return sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()))


def test_convert_repo_id_reads_the_cache_in_place(hub, tiny_fp8, tmp_path):
    upload(hub, tmp_path, tiny_fp8)
    home = tmp_path / "home"
    source_bytes = sum(p.stat().st_size for p in tiny_fp8.iterdir() if p.is_file())
    r = mm_convert(hub, home, "convert", SOURCE_REPO, tmp_path / "out", "--tp", "2", "-q")
    assert r.returncode == 0, r.stderr
    assert "converting from the Hugging Face cache" in r.stderr
    on_disk = unique_file_bytes(home)
    print(f"\nsource {source_bytes} bytes; HF_HOME + MM_CONVERT_CACHE after convert: {on_disk} bytes")
    for name in shards(tiny_fp8):  # each weight shard exactly once: the blob (no second copy anywhere)
        assert copies_of((tiny_fp8 / name).read_bytes(), home, tmp_path / "out") == 1, name
    assert on_disk < source_bytes + 200_000  # blobs, plus huggingface_hub's and our small records
    # byte-identical to converting a plain folder
    r = mm_convert(hub, home, "convert", tiny_fp8, tmp_path / "plain", "--tp", "2", "-q")
    assert r.returncode == 0, r.stderr
    assert tensor_files(tmp_path / "out") == tensor_files(tmp_path / "plain")
    manifest = json.loads((tmp_path / "out" / "mm_convert.json").read_text())["source"]
    assert manifest["repo_id"] == SOURCE_REPO and len(manifest["revision"]) == 40
    assert all(f["sha256"] for f in manifest["files"])  # every shard's blob hashed to the Hub's oid


def test_a_moved_main_still_converts_and_shares_the_blobs(hub, tiny_fp8, tmp_path):
    upload(hub, tmp_path, tiny_fp8)
    home = tmp_path / "home"
    assert mm_convert(hub, home, "convert", SOURCE_REPO, tmp_path / "a", "--tp", "2", "-q").returncode == 0
    first = json.loads((tmp_path / "a" / "mm_convert.json").read_text())["source"]["revision"]
    edit_readme_on_main(hub, tmp_path, "---\nlicense: mit\n---\n# moved\n")
    gets = hub.count(kind="resolve", method="GET")
    r = mm_convert(hub, home, "convert", SOURCE_REPO, tmp_path / "b", "--tp", "2", "-q")
    assert r.returncode == 0, r.stderr
    second = json.loads((tmp_path / "b" / "mm_convert.json").read_text())["source"]["revision"]
    assert second != first
    assert hub.count(kind="resolve", method="GET") - gets == 1  # only the new README: the blobs are shared
    for name in shards(tiny_fp8):
        assert copies_of((tiny_fp8 / name).read_bytes(), home) == 1, name
    assert tensor_files(tmp_path / "a") == tensor_files(tmp_path / "b")


def test_offline_converts_from_the_cache_and_names_what_is_missing(hub, tiny_fp8, tmp_path):
    upload(hub, tmp_path, tiny_fp8)
    home = tmp_path / "home"
    assert mm_convert(hub, home, "download", SOURCE_REPO, "-q").returncode == 0
    before = hub.count()
    offline = "import os; os.environ['HF_HUB_OFFLINE'] = '1'; "
    r = mm_convert(hub, home, "convert", SOURCE_REPO, tmp_path / "out", "--tp", "2", "-q", extra=offline)
    assert r.returncode == 0, r.stderr
    assert hub.count() == before  # not one request
    manifest = json.loads((tmp_path / "out" / "mm_convert.json").read_text())["source"]
    assert manifest["repo_id"] == SOURCE_REPO and all(f["sha256"] for f in manifest["files"])

    snapshot = next((home / "hub").glob("models--*/snapshots/*"))
    gone = shards(tiny_fp8)[2]
    (snapshot / gone).unlink()
    r = mm_convert(hub, home, "convert", SOURCE_REPO, tmp_path / "out2", "--tp", "2", "-q", extra=offline)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert gone in r.stderr and "not cached" in r.stderr and "HF_HUB_OFFLINE=1" in r.stderr
    assert not (tmp_path / "out2").exists()

    r = mm_convert(hub, home, "convert", f"{USER}/never-fetched", tmp_path / "out3", "-q", extra=offline)
    assert r.returncode != 0 and "not in the Hugging Face cache" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert hub.count() == before


def test_a_snapshot_folder_is_a_source(hub, tiny_fp8, tmp_path):
    """A snapshot made by huggingface_hub itself (as `hf download` makes it), passed as SOURCE."""
    upload(hub, tmp_path, tiny_fp8)
    home = tmp_path / "home"
    _hf(hub, home, f"from huggingface_hub import snapshot_download; print(snapshot_download({SOURCE_REPO!r}))")
    snapshot = next((home / "hub").glob("models--*/snapshots/*"))
    assert (snapshot / "config.json").is_symlink()
    r = mm_convert(hub, home, "convert", snapshot, tmp_path / "out", "--tp", "2", "-q")
    assert r.returncode == 0, r.stderr
    source = json.loads((tmp_path / "out" / "mm_convert.json").read_text())["source"]
    assert source["repo_id"] == SOURCE_REPO and source["revision"] == snapshot.name
    assert not any(f["sha256"] for f in source["files"])  # nobody hashed the blobs: no Hub hash is claimed
    # after `download` proved the blobs, the same snapshot carries their sha256
    assert mm_convert(hub, home, "download", SOURCE_REPO, "-q").returncode == 0
    assert mm_convert(hub, home, "convert", snapshot, tmp_path / "out2", "--tp", "2", "-q").returncode == 0
    source = json.loads((tmp_path / "out2" / "mm_convert.json").read_text())["source"]
    assert all(f["sha256"] for f in source["files"])


def _downloaded(hub, tmp_path: Path, tiny: Path) -> tuple[Path, Path]:
    """The tiny source uploaded, then downloaded into a fresh HF_HOME: (home, snapshot folder)."""
    upload(hub, tmp_path, tiny)
    home = tmp_path / "home"
    assert mm_convert(hub, home, "download", SOURCE_REPO, "-q").returncode == 0
    return home, next((home / "hub").glob("models--*/snapshots/*"))


def test_a_snapshot_link_leaving_the_cache_is_refused(hub, tiny_fp8, tmp_path):
    home, snapshot = _downloaded(hub, tmp_path, tiny_fp8)
    name = shards(tiny_fp8)[1]
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes((snapshot / name).read_bytes())
    (snapshot / name).unlink()
    (snapshot / name).symlink_to(outside)
    r = mm_convert(hub, home, "convert", snapshot, tmp_path / "out", "--tp", "2", "-q")
    assert r.returncode != 0 and name in r.stderr and "resolves outside" in r.stderr, r.stderr


def test_a_corrupt_blob_is_caught_removed_and_fetched_again(hub, tiny_fp8, tmp_path):
    home, snapshot = _downloaded(hub, tmp_path, tiny_fp8)
    name = shards(tiny_fp8)[0]
    blob = (snapshot / name).resolve()
    raw = bytearray(blob.read_bytes())
    raw[-10] ^= 0x01
    blob.write_bytes(bytes(raw))  # its stat changed: the earlier proof no longer counts
    r = mm_convert(hub, home, "download", SOURCE_REPO, "-q")
    assert r.returncode != 0 and name in r.stderr and "do not hash to" in r.stderr, r.stderr
    assert not blob.exists()
    r = mm_convert(hub, home, "download", SOURCE_REPO, "-q")
    assert r.returncode == 0, r.stderr
    assert (snapshot / name).read_bytes() == (tiny_fp8 / name).read_bytes()


def test_snapshot_of_recognises_only_cache_snapshots(tmp_path):
    commit = "a" * 40
    snap = snapshot_of(tmp_path / "models--org--name" / "snapshots" / commit)
    assert snap is not None and snap.repo_id == "org/name" and snap.commit == commit
    for bad in (tmp_path / "models--org--name" / "snapshots" / "main", tmp_path / "models--a--b--c" / "snapshots" / commit,
                tmp_path / "datasets--org--name" / "snapshots" / commit, tmp_path / "org" / "name"):
        assert snapshot_of(bad) is None, bad


def test_nothing_published_holds_a_local_path(hub, tiny_bf16, tmp_path):
    """The whole flow from the cache (convert, validate --record, publish): no file that reaches the
    Hub names the machine's folders."""
    upload(hub, tmp_path, tiny_bf16)
    home = tmp_path / "home"
    out = tmp_path / "out"
    assert mm_convert(hub, home, "convert", SOURCE_REPO, out, "--tp", "2", "-q").returncode == 0
    snapshot = next((home / "hub").glob("models--*/snapshots/*"))
    r = mm_convert(hub, home, "validate", out, "--source", snapshot, "--kernel", "reference", "--record")
    assert r.returncode == 0, r.stdout + r.stderr
    r = mm_convert(hub, home, "publish", out, f"{USER}/published")  # not quiet: the one bar
    assert r.returncode == 0, r.stderr
    bars = {line.rsplit("\r", 1)[-1].split(":")[0] for line in r.stderr.splitlines() if "%|" in line}
    assert bars == {f"publish {USER}/published"}, r.stderr  # one overall bar, none per file
    assert ".safetensor" not in r.stderr
    back = tmp_path / "back"
    assert mm_convert(hub, home, "download", f"{USER}/published", back, "-q").returncode == 0
    published = [p for p in back.rglob("*") if p.is_file() and ".cache" not in p.parts and p.name != ".mm-convert-download.json"]
    assert {"README.md", "mm_convert.json", "validation.svg", "config.json"} <= {p.name for p in published}
    for p in published:
        data = p.read_bytes()
        for local in (str(tmp_path), str(Path.home()), "/tmp/"):
            assert local.encode() not in data, (p.name, local)


def test_publish_quiet_prints_no_bar(hub, tiny_fp8, tmp_path):
    out = tmp_path / "out"
    assert mm_convert(hub, tmp_path / "home", "convert", tiny_fp8, out, "--tp", "2", "-q").returncode == 0
    r = mm_convert(hub, tmp_path / "home", "publish", out, f"{USER}/quiet", "-q")
    assert r.returncode == 0 and r.stderr == "", r.stderr
