"""`make run` on a fresh clone: `osprey run` with a clean MODEL_DIR and no OSPREY_MODEL registers the shipped
demo model as the first version, serves it, prints how to connect Label Studio, and answers an interactive
request on a demo image with the right shape and colour.

Real here: `osprey run` (embedded Redis, prediction worker, training worker, server), HTTP, the demo model.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from training import demo_model, synthetic

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[2]
CONFIG = (REPO / "deploy" / "labelstudio" / "demo_shapes.xml").read_text()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = check()
            if found:
                return found
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def region_item(scene, k: int) -> dict:
    """The k-th object of `scene` as the brush region an annotator just drew (interactive context)."""
    from osprey_core.regions import Region

    w, h = scene.size
    rle = Region.from_mask(scene.objects[k].mask).to_ls_brush()
    return {"id": f"drawn{k}", "from_name": "category", "to_name": "image", "type": "brushlabels", "origin": "manual",
            "original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"format": "rle", "rle": rle, "brushlabels": []}}


def test_osprey_run_serves_the_demo_model_on_a_clean_model_dir(tmp_path):
    files = tmp_path / "files"
    scene = synthetic.generate_scene(demo_model.HELD_OUT_SEED + 1, 0, shapes=demo_model.TRAIN_SHAPES,
                                     **demo_model.WORLD)
    (files / "demo").mkdir(parents=True)
    (files / "demo" / "a.png").write_bytes(scene.png_bytes())
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OSPREY_", "LABEL_STUDIO_", "BASIC_AUTH_")) and k != "REDIS_URL"}
    env |= {"MODEL_DIR": str(tmp_path / "data"), "LOCAL_FILES_DOCUMENT_ROOT": str(files), "PYTHONUNBUFFERED": "1",
            "OSPREY_WORKER_HEARTBEAT_S": "1"}
    log_path = tmp_path / "run.log"
    with log_path.open("wb") as log:
        run = subprocess.Popen([sys.executable, "-m", "backend.cli", "run", "--host", "127.0.0.1", "--port",
                                str(port)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_for(lambda: httpx.get(base + "/health", timeout=5).status_code == 200, 300, "/health")
            setup = wait_for(lambda: (r := httpx.post(base + "/setup", timeout=10, json={
                "project": "1.1795681025", "schema": CONFIG, "hostname": "http://localhost:8080",
                "access_token": "legacytoken1234567890abcdef"})).status_code == 200 and r, 300, "/setup")
            from training.registry import Registry

            registry = Registry(tmp_path / "data")
            assert [v.version for v in registry.list()] == [registry.current()]  # the first version
            assert setup.json()["model_version"] == registry.current()
            printed = log_path.read_text(errors="replace")
            assert f"URL http://localhost:{port}" in printed and "deploy/labelstudio/demo_shapes.xml" in printed

            task = {"id": 1, "data": {"image": "/data/local-files/?d=demo/a.png"}, "annotations": [],
                    "predictions": [], "project": 1}
            for k, obj in enumerate(scene.objects):
                body = {"tasks": [task], "project": "1.1795681025", "label_config": CONFIG,
                        "params": {"login": None, "password": None, "context": {"result": [region_item(scene, k)]}}}
                r = httpx.post(base + "/predict", json=body, timeout=120)
                assert r.status_code == 200, r.text
                [answer] = r.json()["results"]
                assert answer["model_version"] == registry.current()
                by_control = {item["from_name"]: item["value"] for item in answer["result"]}
                assert by_control["category"]["brushlabels"] == [obj.shape], (obj, answer)
                assert by_control["color"]["choices"] == [obj.colour], (obj, answer)
        except BaseException:
            print(log_path.read_text(errors="replace")[-4000:])
            raise
        finally:
            if run.poll() is None:
                run.send_signal(signal.SIGINT)
                try:
                    run.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(run.pid, signal.SIGKILL)
                    run.wait()
