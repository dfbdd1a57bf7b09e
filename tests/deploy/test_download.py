"""`osprey download` against a real local HTTP server (stdlib, 127.0.0.1) that plays the Hub's tree API
and resolve URLs and Meta's SAM file server, with small fake files. Nothing leaves the machine.

Covered: a full model + SAM + CLIP download with the exports printed, resuming after the server cuts a
transfer (and after an earlier run left a `.part`), a hash mismatch (clear error, no file left in
place), a size disagreeing with the release manifest, and the CLI's exit codes.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from osprey_core import download as dl

REPO = dl.MODEL_REPOS["osprey-7b"]


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeServer:
    """Files by URL path; `listing` overrides what the tree API says; `cut` paths break mid-body once."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.trees: dict[str, list[dict]] = {}
        self.cut: set[str] = set()
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                path = unquote(urlparse(self.path).path)
                server.requests.append(("GET", path, self.headers.get("Range")))
                tree = re.fullmatch(r"/api/models/(.+)/tree/([^/]+)", path)
                if tree:
                    if tree.group(1) not in server.trees:
                        return self._send(404, b'{"error": "Repository not found"}')
                    body = json.dumps(server.trees[tree.group(1)]).encode()
                    return self._send(200, body, {"Content-Type": "application/json"})
                if path not in server.files:
                    return self._send(404, b"not found")
                data = server.files[path]
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
                    if start >= len(data):
                        return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                    headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
                    status = 206
                else:
                    headers, status = {}, 200
                body = data[start:]
                if path in server.cut:
                    server.cut.discard(path)
                    half = len(body) // 2
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(body)))  # promise all, send half, hang up
                    self.end_headers()
                    self.wfile.write(body[:half])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self._send(status, body, headers)

            def _send(self, status, body, headers=None):
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def add_repo_file(self, repo: str, name: str, data: bytes, lfs: bool, **override) -> None:
        self.files[f"/{repo}/resolve/main/{name}"] = data
        entry = {"type": "file", "path": name, "size": len(data), "oid": git_blob_id(data)}
        if lfs:
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entry["size"] = 134
        entry.update(override)
        self.trees.setdefault(repo, []).append(entry)

    def gets(self, suffix: str) -> list[str | None]:
        return [rng for method, path, rng in self.requests if method == "GET" and path.endswith(suffix)]


@pytest.fixture()
def server(monkeypatch):
    import huggingface_hub.constants

    # Another test module may have switched the Hub client offline for its process; this one talks to
    # a local fake Hub only.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    s = FakeServer()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def fake_checkpoint(server: FakeServer, repo: str = REPO) -> dict[str, bytes]:
    files = {
        "config.json": json.dumps({"model_type": "osprey", "hidden_size": 8}).encode(),
        "added_tokens.json": b'{"<mask>": 32000, "<pos>": 32001}',
        "pytorch_model.bin.index.json": b'{"weight_map": {"a": "pytorch_model-00001-of-00002.bin"}}',
        "pytorch_model-00001-of-00002.bin": bytes(range(256)) * 900,
        "pytorch_model-00002-of-00002.bin": b"\x07" * 70_001,
        "tokenizer.model": b"sp-model" * 100,
        "README.md": b"not needed",  # outside the patterns: must not be fetched
    }
    for name, data in files.items():
        server.add_repo_file(repo, name, data, lfs=name.endswith((".bin", ".model")))
    return files


def fake_sam(server: FakeServer, monkeypatch, model_type: str = "vit_b", data: bytes = b"sam" * 5000,
             listed: bytes | None = None) -> bytes:
    """Serve `data` as the SAM file; the manifest describes `listed` (default: the same bytes)."""
    listed = data if listed is None else listed
    real = dl.SAM_FILES[model_type]
    monkeypatch.setitem(dl.SAM_FILES, model_type,
                        dl.SamFile(real.name, len(listed), hashlib.sha256(listed).hexdigest()))
    server.files[f"/sam/{real.name}"] = data
    return data


def run(server: FakeServer, tmp_path: Path, *args: str) -> int:
    return dl.download_main([*args, "--dir", str(tmp_path), "--hf-endpoint", server.url,
                             "--sam-base-url", f"{server.url}/sam", "--no-progress"])


def test_full_download_verifies_and_prints_exports(server, tmp_path, monkeypatch, capsys):
    files = fake_checkpoint(server)
    sam = fake_sam(server, monkeypatch)
    clip = b"clip-weights" * 300
    server.add_repo_file(dl.CLIP_REPO, dl.CLIP_FILE, clip, lfs=True)
    server.add_repo_file(dl.CLIP_REPO, "open_clip_config.json", b"{}", lfs=False)

    assert run(server, tmp_path, "osprey-7b", "--sam", "vit_b", "--clip") == 0

    model_dir = tmp_path / "osprey-7b"
    for name, data in files.items():
        if name == "README.md":
            assert not (model_dir / name).exists()
        else:
            assert (model_dir / name).read_bytes() == data
    assert (tmp_path / "sam" / dl.SAM_FILES["vit_b"].name).read_bytes() == sam
    assert (tmp_path / "clip" / dl.CLIP_FILE).read_bytes() == clip
    assert not (tmp_path / "clip" / "open_clip_config.json").exists()
    assert not list(tmp_path.rglob("*.part"))
    out = capsys.readouterr().out
    assert f"export OSPREY_MODEL={model_dir.resolve()}" in out
    assert f"export SAM_CHECKPOINT={(tmp_path / 'sam' / dl.SAM_FILES['vit_b'].name).resolve()}" in out
    assert "export SAM_MODEL_TYPE=vit_b" in out

    # A second run finds every file verified in place and fetches nothing.
    before = len([r for r in server.requests if "/resolve/" in r[1] or r[1].startswith("/sam/")])
    assert run(server, tmp_path, "osprey-7b", "--sam", "vit_b") == 0
    after = len([r for r in server.requests if "/resolve/" in r[1] or r[1].startswith("/sam/")])
    assert after == before


def test_resume_after_the_server_cuts_the_transfer(server, tmp_path, monkeypatch):
    files = fake_checkpoint(server)
    shard = "pytorch_model-00001-of-00002.bin"
    server.cut.add(f"/{REPO}/resolve/main/{shard}")
    sam = fake_sam(server, monkeypatch)
    server.cut.add(f"/sam/{dl.SAM_FILES['vit_b'].name}")

    assert run(server, tmp_path, "osprey-7b", "--sam", "vit_b") == 0

    assert (tmp_path / "osprey-7b" / shard).read_bytes() == files[shard]
    assert (tmp_path / "sam" / dl.SAM_FILES["vit_b"].name).read_bytes() == sam
    ranges = server.gets(shard)
    assert ranges[0] is None and len(ranges) == 2
    assert ranges[1] == f"bytes={len(files[shard]) // 2}-"  # picked up exactly where the cut left it
    assert server.gets(dl.SAM_FILES["vit_b"].name)[1] == f"bytes={len(sam) // 2}-"


def test_resume_a_part_file_left_by_an_earlier_run(server, tmp_path, monkeypatch):
    sam = fake_sam(server, monkeypatch)
    name = dl.SAM_FILES["vit_b"].name
    part = tmp_path / "sam" / f"{name}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(sam[:1000])

    assert run(server, tmp_path, "--sam", "vit_b") == 0

    assert server.gets(name) == ["bytes=1000-"]
    assert (tmp_path / "sam" / name).read_bytes() == sam
    assert not part.exists()


def test_sha_mismatch_is_a_clear_error_and_leaves_no_file(server, tmp_path, monkeypatch, capsys):
    good = b"the real checkpoint" * 100
    fake_sam(server, monkeypatch, data=good[:-1] + b"X", listed=good)  # same size, different bytes
    name = dl.SAM_FILES["vit_b"].name

    assert run(server, tmp_path, "--sam", "vit_b") == 1

    err = capsys.readouterr().err
    assert "sha256" in err and hashlib.sha256(good).hexdigest() in err and "removed" in err
    assert not (tmp_path / "sam" / name).exists()
    assert not (tmp_path / "sam" / f"{name}.part").exists()


def test_git_blob_mismatch_on_a_small_hub_file(server, tmp_path):
    fake_checkpoint(server)
    entry = next(e for e in server.trees[REPO] if e["path"] == "config.json")
    entry["oid"] = git_blob_id(b'{"tampered": true}')  # the Hub lists another blob than it serves

    with pytest.raises(dl.DownloadError, match="git blob id"):
        dl.download(tmp_path, "osprey-7b", hf_endpoint=server.url, progress=False, log=lambda _: None)
    assert not (tmp_path / "osprey-7b" / "config.json").exists()


def test_listing_that_disagrees_with_the_release_sizes_is_refused(server, tmp_path, monkeypatch):
    fake_checkpoint(server)
    monkeypatch.setitem(dl.KNOWN_SIZES, REPO, {"pytorch_model-00002-of-00002.bin": 3_990_344_856})

    with pytest.raises(dl.DownloadError, match="3990344856 B"):
        dl.download(tmp_path, "osprey-7b", hf_endpoint=server.url, progress=False, log=lambda _: None)
    assert not (tmp_path / "osprey-7b").exists()  # checked before anything is fetched


def test_a_corrupt_existing_file_is_fetched_again(server, tmp_path, monkeypatch):
    sam = fake_sam(server, monkeypatch)
    dest = tmp_path / "sam" / dl.SAM_FILES["vit_b"].name
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"\0" * len(sam))  # right size, wrong bytes (e.g. a disk error)

    assert run(server, tmp_path, "--sam", "vit_b") == 0
    assert dest.read_bytes() == sam


def test_not_a_checkpoint_and_unknown_repo(server, tmp_path, capsys):
    server.add_repo_file(REPO, "README.md", b"empty repo", lfs=False)
    assert run(server, tmp_path, "osprey-7b") == 1
    assert "not an Osprey checkpoint" in capsys.readouterr().err

    assert run(server, tmp_path, "osprey-chat-7b") == 1  # the fake Hub answers 404 for it
    err = capsys.readouterr().err
    assert "cannot list" in err and dl.MODEL_REPOS["osprey-chat-7b"] in err


def test_cli_needs_something_to_do(capsys):
    assert dl.download_main(["--dir", "/nonexistent"]) == 2
    assert "nothing to do" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dl.download_main(["osprey-13b"])


def test_manifest_names_the_released_files():
    # The official file names encode Meta's release; the sizes are the published byte counts.
    assert dl.SAM_FILES["vit_b"].name == "sam_vit_b_01ec64.pth"
    assert dl.SAM_FILES["vit_h"].name == "sam_vit_h_4b8939.pth"
    assert all(f.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", f.sha256) for f in dl.SAM_FILES.values())
    spec = dl.sam_file_spec("vit_h", Path("/m"))
    assert spec.url == f"{dl.DEFAULT_SAM_BASE_URL}/sam_vit_h_4b8939.pth" and spec.size == 2_564_550_879
