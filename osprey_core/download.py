"""`osprey download`: the released Osprey weights, a SAM checkpoint and the CLIP file into MODEL_DIR.

For users with internet (nothing else in the project downloads). Every file is checked against an
expected size and content hash before it takes its final name, partial downloads resume with HTTP
Range requests, and a file that fails its check is removed, never left where a loader would read it.

Where the hashes come from:
- Hugging Face repos: the file list, sizes and hashes come from the Hub's tree API at the requested
  revision (LFS files carry their sha256, small files their git blob id, which we recompute). The shard
  sizes we know from the release are cross-checked against that list (`KNOWN_SIZES`).
- SAM (plain HTTPS on Meta's file server): the sizes and sha256 values in `SAM_FILES`; vit_l's sha256 is
  not known to us, so it is checked by size only (docs/deploy.md says so).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import OspreyError

DEFAULT_HF_ENDPOINT = "https://huggingface.co"
DEFAULT_SAM_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything"
CHUNK_BYTES = 1 << 20
READ_TIMEOUT_S = 60.0
RETRIES = 5

MODEL_REPOS = {"osprey-7b": "sunshine-lwt/Osprey-7b", "osprey-chat-7b": "sunshine-lwt/Osprey-Chat-7b"}
CLIP_REPO = "laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup"
CLIP_FILE = "open_clip_pytorch_model.bin"
# What a checkpoint directory needs (checkpoint.DOWNLOAD_PATTERNS): weights, configs, tokenizer.
MODEL_PATTERNS = ("*.json", "*.bin", "*.safetensors", "tokenizer.model")
MODEL_REQUIRED = ("config.json",)

# Exact byte sizes published with the release (reference/osprey-spec.md §6): a listing that disagrees
# means a different upload than the one this project was written against.
KNOWN_SIZES: dict[str, dict[str, int]] = {
    "sunshine-lwt/Osprey-Chat-7b": {
        "pytorch_model-00001-of-00002.bin": 9_976_631_486,
        "pytorch_model-00002-of-00002.bin": 3_990_344_856,
    },
}


@dataclass(frozen=True)
class SamFile:
    name: str
    size: int
    sha256: str | None  # None: not known to us, checked by size only


SAM_FILES = {
    "vit_b": SamFile("sam_vit_b_01ec64.pth", 375_042_383,
                     "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
    "vit_l": SamFile("sam_vit_l_0b3195.pth", 1_249_524_607, None),
    "vit_h": SamFile("sam_vit_h_4b8939.pth", 2_564_550_879,
                     "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
}


class DownloadError(OspreyError):
    """A download failed, or a file did not match its expected size or hash."""


@dataclass(frozen=True)
class FileSpec:
    """One file to fetch and how to check it."""

    url: str
    dest: Path
    size: int | None = None
    sha256: str | None = None
    git_blob_sha1: str | None = None  # Hub files outside LFS are identified by their git blob id
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def part(self) -> Path:
        return self.dest.with_name(self.dest.name + ".part")


# --- checking ---------------------------------------------------------------------------------------


class _Hasher:
    """sha256 and/or git blob sha1 over the bytes as they are written (resumed bytes hashed first)."""

    def __init__(self, spec: FileSpec, total: int | None):
        self.sha256 = hashlib.sha256() if spec.sha256 else None
        self.git = None
        if spec.git_blob_sha1:
            if total is None:
                raise DownloadError(f"{spec.url}: the size is unknown, so its git blob id cannot be checked")
            self.git = hashlib.sha1(f"blob {total}\0".encode(), usedforsecurity=False)

    def update(self, data: bytes) -> None:
        if self.sha256 is not None:
            self.sha256.update(data)
        if self.git is not None:
            self.git.update(data)

    def update_from_file(self, path: Path, limit: int) -> None:
        with path.open("rb") as f:
            remaining = limit
            while remaining > 0:
                data = f.read(min(CHUNK_BYTES, remaining))
                if not data:
                    break
                self.update(data)
                remaining -= len(data)


def _check(spec: FileSpec, path: Path, hasher: _Hasher) -> None:
    """Raise (after removing `path`) when the size or a hash differs from the expected value."""
    got_size = path.stat().st_size
    problems = []
    if spec.size is not None and got_size != spec.size:
        problems.append(f"size {got_size} B, expected {spec.size} B")
    if hasher.sha256 is not None and hasher.sha256.hexdigest() != spec.sha256:
        problems.append(f"sha256 {hasher.sha256.hexdigest()}, expected {spec.sha256}")
    if hasher.git is not None and hasher.git.hexdigest() != spec.git_blob_sha1:
        problems.append(f"git blob id {hasher.git.hexdigest()}, expected {spec.git_blob_sha1}")
    if problems:
        path.unlink(missing_ok=True)
        raise DownloadError(
            f"{spec.url} does not match its manifest ({'; '.join(problems)}); the downloaded file was removed. "
            "Run the command again; if it fails the same way, the server holds a different file than expected."
        )


def _verify_existing(spec: FileSpec) -> bool:
    """True when `dest` is already there and passes every check (a rerun skips it)."""
    if not spec.dest.is_file():
        return False
    size = spec.dest.stat().st_size
    if spec.size is not None and size != spec.size:
        return False
    hasher = _Hasher(spec, size)
    hasher.update_from_file(spec.dest, size)
    try:
        _check(spec, spec.dest, hasher)
    except DownloadError:
        return False  # _check removed it; fetch it again
    return True


# --- fetching ---------------------------------------------------------------------------------------


def _progress(spec: FileSpec, total: int | None, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                desc=spec.dest.name, disable=not enabled, leave=True, file=sys.stderr)


def _fetch_once(client, spec: FileSpec, progress: bool) -> None:
    """One GET from where the `.part` file ends; raises httpx errors when the connection breaks."""
    offset = spec.part.stat().st_size if spec.part.exists() else 0
    if spec.size is not None and offset > spec.size:
        spec.part.unlink()
        offset = 0
    if spec.size is not None and offset == spec.size:
        return
    headers = dict(spec.headers)
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with client.stream("GET", spec.url, headers=headers) as r:
        if r.status_code == 416:  # nothing after offset: the .part is complete or stale; checks decide
            return
        if r.status_code == 200 and offset:
            offset = 0  # the server ignored Range: start over
        elif r.status_code not in (200, 206):
            raise DownloadError(f"GET {spec.url} answered HTTP {r.status_code}")
        if r.status_code == 206 and not r.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            raise DownloadError(f"GET {spec.url} answered a Range other than the one asked for: "
                                f"{r.headers.get('Content-Range')!r}")
        total = spec.size
        if total is None and r.headers.get("Content-Length"):
            total = offset + int(r.headers["Content-Length"])
        with spec.part.open("ab" if offset else "wb") as f, _progress(spec, total, offset, progress) as bar:
            for data in r.iter_bytes():  # as received: a cut keeps every byte that arrived
                f.write(data)
                bar.update(len(data))


def download_file(spec: FileSpec, progress: bool = True, retries: int = RETRIES, client=None) -> Path:
    """Fetch `spec.url` to `spec.dest`, resuming `.part` files, then check size and hashes.

    A broken connection is retried (resuming) up to `retries` times; a mismatch removes the file and
    raises DownloadError.
    """
    import httpx

    if _verify_existing(spec):
        return spec.dest
    spec.dest.parent.mkdir(parents=True, exist_ok=True)
    own = client is None
    client = client or httpx.Client(follow_redirects=True, timeout=httpx.Timeout(READ_TIMEOUT_S, connect=15.0))
    try:
        for attempt in range(retries + 1):
            try:
                _fetch_once(client, spec, progress)
                short = spec.size is not None and spec.part.exists() and spec.part.stat().st_size < spec.size
                if not short:
                    break
                error: Exception = DownloadError("the connection closed before the end of the file")
            except httpx.TransportError as e:
                error = e
            if attempt == retries:
                raise DownloadError(
                    f"GET {spec.url} failed {retries + 1} times ({error}); the partial file {spec.part} is kept, "
                    "run the command again to resume"
                ) from error
    finally:
        if own:
            client.close()
    if not spec.part.exists():
        raise DownloadError(f"GET {spec.url} gave no data")
    size = spec.part.stat().st_size
    hasher = _Hasher(spec, size if spec.size is None else spec.size)
    hasher.update_from_file(spec.part, size)
    _check(spec, spec.part, hasher)
    os.replace(spec.part, spec.dest)
    return spec.dest


# --- what to fetch ----------------------------------------------------------------------------------


def hf_file_specs(
    repo_id: str,
    dest_dir: Path,
    patterns: Sequence[str],
    revision: str = "main",
    endpoint: str | None = None,
    token: str | None = None,
) -> list[FileSpec]:
    """The files of a Hub repo matching `patterns`, with the sizes and hashes the Hub lists for them."""
    from huggingface_hub import HfApi, hf_hub_url
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import build_hf_headers

    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT).rstrip("/")
    try:
        entries = list(HfApi(endpoint=endpoint, token=token).list_repo_tree(repo_id, revision=revision,
                                                                            recursive=True))
    except Exception as e:  # offline, unknown repo or revision, gated repo...
        raise DownloadError(f"cannot list {repo_id}@{revision} on {endpoint}: {e}") from e
    headers = build_hf_headers(token=token) if token else {}
    known = KNOWN_SIZES.get(repo_id, {})
    specs = []
    for entry in entries:
        if not isinstance(entry, RepoFile) or not any(fnmatch.fnmatch(entry.path, p) for p in patterns):
            continue
        size = entry.lfs.size if entry.lfs else entry.size
        if entry.path in known and known[entry.path] != size:
            raise DownloadError(f"{repo_id}/{entry.path} is listed with {size} B, the release had "
                                f"{known[entry.path]} B; pass --revision to pick the release")
        specs.append(FileSpec(
            url=hf_hub_url(repo_id, entry.path, revision=revision, endpoint=endpoint),
            dest=dest_dir / entry.path,
            size=size,
            sha256=entry.lfs.sha256 if entry.lfs else None,
            git_blob_sha1=None if entry.lfs else entry.blob_id,
            headers=headers,
        ))
    return specs


def sam_file_spec(model_type: str, dest_dir: Path, base_url: str | None = None) -> FileSpec:
    if model_type not in SAM_FILES:
        raise DownloadError(f"unknown SAM type {model_type!r}; use one of {', '.join(SAM_FILES)}")
    f = SAM_FILES[model_type]
    base = (base_url or os.environ.get("OSPREY_SAM_BASE_URL") or DEFAULT_SAM_BASE_URL).rstrip("/")
    return FileSpec(url=f"{base}/{f.name}", dest=dest_dir / f.name, size=f.size, sha256=f.sha256)


@dataclass
class DownloadResult:
    model_dir: Path | None = None
    sam_checkpoint: Path | None = None
    sam_model_type: str | None = None
    clip_file: Path | None = None

    def exports(self) -> list[str]:
        lines = []
        if self.model_dir:
            lines.append(f"export OSPREY_MODEL={self.model_dir}")
        if self.sam_checkpoint:
            lines += [f"export SAM_CHECKPOINT={self.sam_checkpoint}", f"export SAM_MODEL_TYPE={self.sam_model_type}"]
        if self.clip_file:
            lines.append(f"export OSPREY_VISION_TOWER_FILE={self.clip_file}  # for a checkpoint without the vision weights")
        return lines


def download(
    model_dir: Path,
    model: str | None = None,
    sam: str | None = None,
    clip: bool = False,
    revision: str = "main",
    hf_endpoint: str | None = None,
    sam_base_url: str | None = None,
    token: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> DownloadResult:
    """Fetch what was asked for into `model_dir`/{model,sam,clip}; returns where each landed."""
    model_dir = Path(model_dir).expanduser().resolve()
    result = DownloadResult()
    if model is not None:
        if model not in MODEL_REPOS:
            raise DownloadError(f"unknown model {model!r}; use one of {', '.join(MODEL_REPOS)}")
        repo = MODEL_REPOS[model]
        dest = model_dir / model
        specs = hf_file_specs(repo, dest, MODEL_PATTERNS, revision, hf_endpoint, token)
        names = {s.dest.name for s in specs}
        missing = [n for n in MODEL_REQUIRED if n not in names]
        if missing or not any(n.endswith((".bin", ".safetensors")) for n in names):
            raise DownloadError(f"{repo}@{revision} lacks {', '.join(missing) or 'weight files'}; "
                                "it is not an Osprey checkpoint")
        log(f"{repo} -> {dest} ({len(specs)} files, {sum(s.size or 0 for s in specs) / 2**30:.1f} GiB)")
        for spec in specs:
            download_file(spec, progress=progress)
        result.model_dir = dest
    if sam is not None:
        spec = sam_file_spec(sam, model_dir / "sam", sam_base_url)
        log(f"SAM {sam} -> {spec.dest}")
        result.sam_checkpoint = download_file(spec, progress=progress)
        result.sam_model_type = sam
    if clip:
        specs = hf_file_specs(CLIP_REPO, model_dir / "clip", (CLIP_FILE,), "main", hf_endpoint, token)
        if not specs:
            raise DownloadError(f"{CLIP_REPO} has no {CLIP_FILE}")
        log(f"CLIP ConvNeXt-L -> {specs[0].dest}")
        result.clip_file = download_file(specs[0], progress=progress)
    return result


# --- command line -----------------------------------------------------------------------------------


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="osprey download", description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", choices=sorted(MODEL_REPOS), help="released Osprey checkpoint")
    p.add_argument("--sam", choices=sorted(SAM_FILES), help="also fetch this SAM checkpoint")
    p.add_argument("--clip", action="store_true",
                   help=f"also fetch {CLIP_FILE} (only for checkpoints that lack the vision weights)")
    p.add_argument("--dir", type=Path, default=Path(os.environ.get("MODEL_DIR", "data")),
                   help="target directory (default: $MODEL_DIR or ./data)")
    p.add_argument("--revision", default="main", help="Hub revision (branch, tag or commit) of the model")
    p.add_argument("--hf-endpoint", default=None, help="Hub URL (default: $HF_ENDPOINT or huggingface.co)")
    p.add_argument("--sam-base-url", default=None,
                   help="where the SAM files live (default: $OSPREY_SAM_BASE_URL or Meta's file server)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def download_main(argv: list[str]) -> int:
    """Entry point of `osprey download`; 0 on success, 1 on a download or check failure."""
    args = build_parser().parse_args(argv)
    if args.model is None and args.sam is None and not args.clip:
        print("osprey download: nothing to do; name a model, --sam or --clip", file=sys.stderr)
        return 2
    try:
        result = download(args.dir, args.model, args.sam, args.clip, args.revision, args.hf_endpoint,
                          args.sam_base_url, token=os.environ.get("HF_TOKEN"), progress=not args.no_progress)
    except DownloadError as e:
        print(f"osprey download: {e}", file=sys.stderr)
        return 1
    print("\n".join(["# set these for `osprey worker` / `osprey run`:", *result.exports()]))
    return 0


if __name__ == "__main__":
    raise SystemExit(download_main(sys.argv[1:]))
