"""`mm-convert download`, `publish` and `run` for real: the real huggingface_hub client (in a
subprocess, the way users run it) against tests/hubserver.py, which speaks the Hub's protocol."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from huggingface_hub import ModelCard

from mm_convert.commands.convert import ConvertOptions, convert
from tests import hub_rules
from tests.conftest import REPO
from tests.hubserver import HubServer, _is_binary

TOKEN = "hf_mmconverttest0123456789abcdefgh"
USER = "mm-test"
# The client's retry back-off (1, 2, 4, 8, 8 s per failed LFS PUT) is not what these tests measure.
NO_SLEEP = "import time; time.sleep = lambda s: None; "


def mm_convert(hub: HubServer, home: Path, *args, cwd: Path | None = None, no_sleep: bool = False, token: str = TOKEN,
               extra: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(home), HF_TOKEN=token,
               HF_HUB_DISABLE_UPDATE_CHECK="1", PYTHONPATH=str(REPO), MM_CONVERT_CACHE=str(home / "mmc-cache"))
    code = (NO_SLEEP if no_sleep else "") + extra + "import sys; from mm_convert.cli import main; sys.argv[0] = 'mm-convert'; main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def lfs_objects(hub: HubServer, folder: Path) -> int:
    """How many distinct objects the Hub stores by LFS for a folder (binary or large files, by content)."""
    blobs = {p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    return len({hashlib.sha256(b).hexdigest() for b in blobs if len(b) > hub.lfs_threshold or _is_binary(b[:512])})


def data_file(folder: Path, n: int) -> str:
    """The n-th largest tensor file of a converted folder, relative to it."""
    files = sorted((p for p in folder.rglob("*.safetensor*") if p.is_file()), key=lambda p: (-p.stat().st_size, str(p)))
    return str(files[n].relative_to(folder))


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and not str(p.relative_to(folder)).startswith((".cache", ".mm-convert"))}


@pytest.fixture
def hub(tmp_path):
    with HubServer(tmp_path / "hub-root", token=TOKEN, user=USER, log_stderr=False) as server:
        yield server


@pytest.fixture
def converted(tiny_fp8, tmp_path) -> Path:
    out = tmp_path / "out"
    convert(tiny_fp8, out, ConvertOptions(tp=4, quiet=True))
    return out


def test_publish_download_round_trip(hub, converted, tmp_path):
    r = mm_convert(hub, tmp_path, "publish", converted, f"{USER}/tiny-tp4", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "published to" in r.stdout
    commits = hub.count(kind="commit")
    assert commits >= 2  # the weights, then the card, config and manifest in a last commit
    r = mm_convert(hub, tmp_path, "download", f"{USER}/tiny-tp4", tmp_path / "back", "--quiet")
    assert r.returncode == 0, r.stderr
    assert files_of(tmp_path / "back") == files_of(converted)
    record = json.loads((tmp_path / "back" / ".mm-convert-download.json").read_text())
    assert len(record["revision"]) == 40 and record["requested_revision"] is None
    assert all(len(f["sha256"]) == 64 for name, f in record["files"].items() if name.endswith(".safetensors"))


def test_last_commit_holds_card_config_manifest(hub, converted, tmp_path):
    assert mm_convert(hub, tmp_path, "publish", converted, f"{USER}/tiny", "-q", "--batch-size", "4MB").returncode == 0
    commits = [r for r in hub.requests if r["kind"] == "commit"]
    assert len(commits) >= 4  # 4 MB batches of a 15 MB checkpoint, then the final commit
    code = ("from huggingface_hub import HfApi; import json; api = HfApi(); "
            f"cs = api.list_repo_commits('{USER}/tiny'); "
            f"print(json.dumps([[c.title, api.list_repo_files('{USER}/tiny', revision=c.commit_id)] for c in cs]))")
    history = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                        env={**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1",
                                             "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path)}).stdout)
    titles = [title for title, _ in history]
    assert titles[0] == "mm-convert: model card, config, manifest and presharded READY (publish complete)"
    assert all(t.startswith("mm-convert: upload part") for t in titles[1:-1])
    # Until the last commit the repo has no card, config, manifest, checksum.json or READY:
    # a half-published repo neither looks complete nor loads.
    last_names = {"README.md", "config.json", "mm_convert.json", "checksum.json", "READY"}
    assert last_names <= {f.rsplit("/", 1)[-1] for f in history[0][1]}
    assert not last_names & {f.rsplit("/", 1)[-1] for f in history[1][1]}


def test_republish_uploads_nothing(hub, converted, tmp_path):
    assert mm_convert(hub, tmp_path, "publish", converted, f"{USER}/tiny", "-q").returncode == 0
    puts, commits = hub.count(kind="lfs-put"), hub.count(kind="commit")
    r = mm_convert(hub, tmp_path, "publish", converted, f"{USER}/tiny", "-q")
    assert r.returncode == 0 and "already up to date" in r.stdout and "no commit" in r.stdout
    assert hub.count(kind="lfs-put") == puts and hub.count(kind="commit") == commits


def test_interrupted_publish_resumes(hub, converted, tmp_path):
    # Every PUT from the second on loses its connection: the client retries 5 times, then gives up.
    hub.drop_lfs_put(nth=2, times=100)
    r = mm_convert(hub, tmp_path, "publish", converted, f"{USER}/tiny", "-q", no_sleep=True)
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "a rerun uploads only what is missing" in r.stderr
    stored_before = hub.count(kind="lfs-put", status=200)
    assert stored_before >= 1
    hub.clear_faults()
    puts_before = hub.count(kind="lfs-put")
    r = mm_convert(hub, tmp_path, "publish", converted, f"{USER}/tiny", "-q")
    assert r.returncode == 0, r.stderr
    # The objects stored before the cut are not sent again.
    assert hub.count(kind="lfs-put") - puts_before == lfs_objects(hub, converted) - stored_before
    r = mm_convert(hub, tmp_path, "download", f"{USER}/tiny", tmp_path / "back", "-q")
    assert r.returncode == 0 and files_of(tmp_path / "back") == files_of(converted)


def test_commit_error_is_clear_and_folder_untouched(hub, converted, tmp_path):
    before = files_of(converted)
    hub.fail_next_commit(status=500, message="storage backend unavailable")
    r = mm_convert(hub, tmp_path, "publish", converted, f"{USER}/tiny", "-q")
    assert r.returncode != 0
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "HTTP 500" in err and "commit 1 of" in err
    assert files_of(converted) == before
    assert mm_convert(hub, tmp_path, "publish", converted, f"{USER}/tiny", "-q").returncode == 0


def test_hash_mismatch_on_download_is_caught(hub, converted, tmp_path):
    assert mm_convert(hub, tmp_path, "publish", converted, f"{USER}/tiny", "-q").returncode == 0
    bad = data_file(converted, 1)
    hub.corrupt_download(bad, mode="flip")
    r = mm_convert(hub, tmp_path, "download", f"{USER}/tiny", tmp_path / "back", "-q")
    assert r.returncode != 0
    assert bad in r.stderr and "does not match the Hub's" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "back" / bad).exists()  # removed, so a rerun fetches it again
    hub.clear_faults()
    gets_before = hub.count(kind="resolve", method="GET")
    r = mm_convert(hub, tmp_path, "download", f"{USER}/tiny", tmp_path / "back", "-q")
    assert r.returncode == 0, r.stderr
    assert "1 files fetched and verified" in r.stdout  # the rest were verified already
    assert hub.count(kind="resolve", method="GET") - gets_before == 1
    assert files_of(tmp_path / "back") == files_of(converted)


def test_interrupted_download_resumes(hub, converted, tmp_path):
    assert mm_convert(hub, tmp_path, "publish", converted, f"{USER}/tiny", "-q").returncode == 0
    cut = data_file(converted, 2)
    hub.drop_download(cut, after_bytes=0, times=100)
    r = mm_convert(hub, tmp_path, "download", f"{USER}/tiny", tmp_path / "back", "-q", no_sleep=True)
    assert r.returncode != 0 and "a rerun resumes" in r.stderr
    hub.clear_faults()
    r = mm_convert(hub, tmp_path, "download", f"{USER}/tiny", tmp_path / "back", "-q")
    assert r.returncode == 0, r.stderr
    assert files_of(tmp_path / "back") == files_of(converted)


def test_disk_space_checked_first(hub, converted, tmp_path):
    assert mm_convert(hub, tmp_path, "publish", converted, f"{USER}/tiny", "-q").returncode == 0
    tiny_disk = ("import shutil, collections; "
                 "shutil.disk_usage = lambda p: collections.namedtuple('u', 'total used free')(10**7, 9 * 10**6, 10**6); ")
    r = mm_convert(hub, tmp_path, "download", f"{USER}/tiny", tmp_path / "back", "-q", extra=tiny_disk)
    assert r.returncode != 0 and "GB more but only" in r.stderr
    assert hub.count(kind="resolve", method="GET") == 0  # refused before fetching anything


def test_pinned_revision_is_resolved_and_recorded(hub, converted, tmp_path):
    assert mm_convert(hub, tmp_path, "publish", converted, f"{USER}/tiny", "-q").returncode == 0
    r = mm_convert(hub, tmp_path, "download", f"{USER}/tiny", tmp_path / "a", "-q", "--revision", "main")
    assert r.returncode == 0
    sha = json.loads((tmp_path / "a" / ".mm-convert-download.json").read_text())["revision"]
    r = mm_convert(hub, tmp_path, "download", f"{USER}/tiny", tmp_path / "b", "-q", "--revision", sha[:12])
    assert r.returncode == 0 and json.loads((tmp_path / "b" / ".mm-convert-download.json").read_text())["revision"] == sha
    r = mm_convert(hub, tmp_path, "download", f"{USER}/tiny", tmp_path / "c", "-q", "--revision", "no-such-branch")
    assert r.returncode != 0 and "cannot read the repository" in r.stderr


def test_run_downloads_converts_validates_publishes(hub, tiny_fp8, tmp_path):
    """A source on the Hub (the tiny model published as MiniMaxAI/MiniMax-M2.5 on the local server)
    through `run`, then the same again: every step skipped."""
    source_repo = "MiniMaxAI/MiniMax-M2.5"
    code = (f"from huggingface_hub import HfApi; api = HfApi(); api.create_repo('{source_repo}', exist_ok=True); "
            f"api.upload_folder(repo_id='{source_repo}', folder_path='{tiny_fp8}')")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                   env={**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": TOKEN,
                        "HF_HOME": str(tmp_path / "h0")})
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'''name = "e2e"
work_dir = "{tmp_path / 'work'}"
[source]
repo_id = "{source_repo}"
revision = "main"
[convert]
profile = "trtllm"
tp = 4
ep = 2
[validate]
kernel = "reference"
layers = [0, 2]
tokens = 16
[publish]
enabled = true
repo_id = "{USER}/m25-fp8-trtllm-tp4-ep2"
''')
    r = mm_convert(hub, tmp_path, "run", recipe, "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    steps = {line.split()[0]: line.split()[1] for line in r.stdout.splitlines()[2:]}
    assert steps == {"source": "done", "convert": "done", "validate": "done", "publish": "done"}, r.stdout
    r = mm_convert(hub, tmp_path, "run", recipe, "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    steps = {line.split()[0]: line.split()[1] for line in r.stdout.splitlines()[2:]}
    assert steps == {"source": "skipped", "convert": "skipped", "validate": "skipped", "publish": "skipped"}, r.stdout

    out = tmp_path / "work" / "out"
    card = (out / "README.md").read_text()
    meta = ModelCard(card).data.to_dict()
    assert meta["base_model"] == source_repo and meta["base_model_relation"] == "quantized"
    assert {"fp8", "sglang", "mm-convert"} <= set(meta["tags"]) and meta["library_name"] == "transformers"
    assert meta["license_name"] == "synthetic-test-weights" and hub_rules.problems(meta) == []
    revision = json.loads((out / "mm_convert.json").read_text())["source"]["revision"]
    assert len(revision) == 40 and revision in card
    for needed in ("--moe-runner-backend flashinfer_trtllm_routed", "--tp-size 4 --ep-size 2", "`use_shuffled_weight=True`",
                   "## Validation", "**tp4-ep2: passed**", "| tp4-ep2 | 0 |", "| tp4-ep2 | 2 |",
                   f"SOURCE=$(mm-convert download {source_repo} --revision {revision} -q)",
                   'mm-convert convert "$SOURCE" OUT --profile trtllm --tp 4 --ep 2'):
        assert needed in card, needed
    manifest = json.loads((out / "mm_convert.json").read_text())
    assert manifest["source"]["repo_id"] == source_repo
    assert all(f["sha256"] for f in manifest["source"]["files"])  # verified LFS oids from the download


def test_token_never_appears(hub, converted, tmp_path):
    outputs = []
    for args in (("publish", converted, f"{USER}/tiny"), ("publish", converted, f"{USER}/tiny"),
                 ("download", f"{USER}/tiny", tmp_path / "back")):
        r = mm_convert(hub, tmp_path, *args)
        outputs += [r.stdout, r.stderr]
    # A server that echoes the credentials in its error message: the message is shown, the token is not.
    hub.fail_next_commit(status=500, message=f"echoing your credentials: {TOKEN}")
    r = mm_convert(hub, tmp_path, "publish", converted, f"{USER}/another")
    outputs += [r.stdout, r.stderr]
    assert r.returncode != 0 and "echoing your credentials" in r.stderr
    for text in outputs:
        assert TOKEN not in text
    for path in list(converted.rglob("*")) + list((tmp_path / "back").rglob("*")):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_convert_accepts_a_repo_id(hub, tiny_fp8, tmp_path):
    code = (f"from huggingface_hub import HfApi; api = HfApi(); api.create_repo('{USER}/src', exist_ok=True); "
            f"api.upload_folder(repo_id='{USER}/src', folder_path='{tiny_fp8}')")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                   env={**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": TOKEN,
                        "HF_HOME": str(tmp_path / "h0")})
    r = mm_convert(hub, tmp_path, "convert", f"{USER}/src", tmp_path / "out", "--tp", "2", "-q")
    assert r.returncode == 0, r.stderr
    assert "converting from the Hugging Face cache" in r.stderr and "models--mm-test--src/snapshots/" in r.stderr
    manifest = json.loads((tmp_path / "out" / "mm_convert.json").read_text())
    assert manifest["source"]["repo_id"] == f"{USER}/src" and len(manifest["source"]["revision"]) == 40
    digest = hashlib.sha256((tiny_fp8 / "model-00001-of-00004.safetensors").read_bytes()).hexdigest()
    assert {f["name"]: f["sha256"] for f in manifest["source"]["files"]}["model-00001-of-00004.safetensors"] == digest


def test_hubserver_starts_on_its_own(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tests.hubserver", "--help"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "--root" in r.stdout


def _upload_source(hub: HubServer, home: Path, repo: str, folder: Path, ignore: list[str] | None = None) -> None:
    code = (f"from huggingface_hub import HfApi; api = HfApi(); api.create_repo('{repo}', exist_ok=True); "
            f"api.upload_folder(repo_id='{repo}', folder_path='{folder}', ignore_patterns={ignore or []!r})")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                   env={**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": TOKEN,
                        "HF_HOME": str(home)})


def test_bad_revision_refused_before_any_request(hub, tmp_path):
    for revision in ("../evil", "main/../x", "a b", "-rf"):
        r = mm_convert(hub, tmp_path, "download", f"{USER}/x", tmp_path / "d", "--revision", revision, "-q")
        assert r.returncode != 0 and "not a branch, tag or commit name" in r.stderr, (revision, r.stderr)
    assert hub.count() == 0


def test_repo_missing_a_shard_is_refused(hub, tiny_fp8, tmp_path):
    index = json.loads((tiny_fp8 / "model.safetensors.index.json").read_text())
    missing = sorted(set(index["weight_map"].values()))[1]
    _upload_source(hub, tmp_path / "h0", f"{USER}/incomplete", tiny_fp8, ignore=[missing])
    r = mm_convert(hub, tmp_path, "download", f"{USER}/incomplete", tmp_path / "d", "-q")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert f"names {missing}, which the repo does not have" in r.stderr


def test_provenance_records_what_was_read(hub, tiny_fp8, tmp_path):
    """The Hub's sha256 is recorded only for files still as downloaded; an edited shard gets none."""
    _upload_source(hub, tmp_path / "h0", f"{USER}/src", tiny_fp8)
    folder = tmp_path / "d"
    assert mm_convert(hub, tmp_path, "download", f"{USER}/src", folder, "-q").returncode == 0
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    edited = index["weight_map"]["model.layers.1.block_sparse_moe.experts.3.w3.weight"]
    raw = bytearray((folder / edited).read_bytes())
    raw[-50] ^= 0x01  # an FP8 byte of the last tensor in that shard: still a valid checkpoint
    (folder / edited).write_bytes(bytes(raw))
    r = mm_convert(hub, tmp_path, "convert", folder, tmp_path / "out", "--tp", "2", "-q")
    assert r.returncode == 0, r.stderr
    files = {f["name"]: f for f in json.loads((tmp_path / "out" / "mm_convert.json").read_text())["source"]["files"]}
    assert files[edited]["sha256"] is None
    assert all(f["sha256"] for name, f in files.items() if name != edited)


def test_publish_is_private_unless_public_is_asked_from_cli_and_python(hub, converted, tmp_path):
    import inspect

    import mm_convert as package

    assert mm_convert(hub, tmp_path, "publish", converted, f"{USER}/default", "-q").returncode == 0
    assert mm_convert(hub, tmp_path, "publish", converted, f"{USER}/open", "-q", "--public").returncode == 0
    private = {name: json.loads((hub.root / "repos" / "models" / USER / name / "repo.json").read_text())["private"]
               for name in ("default", "open")}
    assert private == {"default": True, "open": False}
    assert inspect.signature(package.publish).parameters["private"].default is True
    from mm_convert.recipe import PublishSpec

    assert PublishSpec().private is True
