"""`make screenshots` (`osprey demo --screenshots DIR`): the README's pictures, taken in a real browser.

Starts the demo (backend/demo.py), has the backend predict every task, then drives Debian's `chromium`
through Playwright (the system executable, never `playwright install`) over Label Studio: the labeling page
with our prediction selected (region, label + score, colour, caption), an interactive suggestion drawn with
Auto-Annotation on, the model card, and the versions after a retrain (every task corrected as an annotator
would, *Start Training*, the promoted version's predictions retrieved). Each picture is a separate step: one
that cannot be taken is reported and the others are still written.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from backend.demo import DEMO_PASSWORD, DEMO_USER, Demo, start_demo
from backend.labelstudio import devserver
from backend.settings import Settings

VIEWPORT = {"width": 1400, "height": 900}
# The retrain needs enough corrections of the class the demo model never saw (the loop test uses 50 images
# with crosses; 60 random demo images hold about as many crosses). Runs start only on Start Training then:
# a threshold run would train on the first few corrections while the rest are still arriving.
TRAIN_IMAGES = 60
TRAIN_ENV = {"OSPREY_TRAIN_MIN_CORRECTIONS": "1000000"}


def chromium_path() -> str | None:
    """Debian's chromium (`apt-get install chromium`), or None."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _versions(demo: Demo) -> dict:
    return httpx.get(demo.backend_url + "/versions", auth=(DEMO_USER, DEMO_PASSWORD), timeout=10).json()


def _current_version(demo: Demo) -> str:
    return _versions(demo)["current"]


def predict_all(demo: Demo, timeout_s: float = 900, version: str | None = None) -> str:
    """Retrieve Predictions on every task and wait until each has one of `version` (default: the served
    one; after a promotion, the promoted one, which the workers load at this batch's first job)."""
    version = version or _current_version(demo)
    demo.ls.retrieve_predictions(demo.project)
    deadline = time.monotonic() + timeout_s
    for task in demo.ls.tasks(demo.project):
        while not any(p["model_version"] == version for p in demo.ls.predictions(task["id"])):
            if time.monotonic() > deadline:
                raise TimeoutError(f"task {task['id']} got no prediction of {version} within {timeout_s:.0f} s")
            time.sleep(2)
    demo.ls.call("PATCH", f"/api/projects/{demo.project}",
                 json={"model_version": version, "show_collab_predictions": True})
    return version


def retrain(demo: Demo, timeout_s: float = 900) -> str:
    """"Start Training" (`POST /api/ml/{id}/train`); wait for the run it queues and return the version it
    promoted (a refused or failed run raises with the gate's reasons). Workers load a promoted version at
    their next job, so the caller's next predictions carry it."""
    pressed = time.time()  # the runs' clock: the backend runs on this machine
    ml = demo.ls.backends(demo.project)[0]
    demo.ls.call("POST", f"/api/ml/{ml['id']}/train", expect=(200, 201))
    deadline = time.monotonic() + timeout_s
    while True:
        done = [r for r in _versions(demo)["training"]["runs"]  # newest first
                if float(r.get("started_at") or 0) >= pressed - 1 and r.get("finished_at")]
        if done:
            run = done[-1]
            if run.get("status") != "promoted":
                raise RuntimeError(f"the retrain was not promoted: {run}")
            return run["version"]
        if time.monotonic() > deadline:
            raise TimeoutError(f"no finished training run within {timeout_s:.0f} s of Start Training")
        time.sleep(5)


def serve_version(demo: Demo, version: str, timeout_s: float = 300) -> None:
    """Until a worker's next job a promoted version is not what the backend reports serving, and Label
    Studio skips tasks that already hold a prediction of the version it last heard of: answer one task
    directly (the worker loads `version` for it), then have Label Studio refresh the backend's state."""
    from backend.demo import CONFIG

    task = demo.ls.call("GET", f"/api/tasks/{demo.ls.tasks(demo.project)[0]['id']}")
    body = {"tasks": [task], "project": f"{demo.project}.0", "label_config": CONFIG.read_text(), "params": {}}
    deadline = time.monotonic() + timeout_s
    while True:
        r = httpx.post(demo.backend_url + "/predict", json=body, auth=(DEMO_USER, DEMO_PASSWORD), timeout=60)
        if r.status_code == 200 and r.json()["results"][0].get("model_version") == version:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"the workers did not serve {version} within {timeout_s:.0f} s")
        time.sleep(2)
    ml = demo.ls.backends(demo.project)[0]
    # Saving the connection again (as the model card's Save does) makes Label Studio re-read /setup.
    demo.ls.call("PATCH", f"/api/ml/{ml['id']}", json={
        "title": ml["title"], "url": ml["url"], "project": demo.project, "auth_method": "BASIC_AUTH",
        "basic_auth_user": DEMO_USER, "basic_auth_pass": DEMO_PASSWORD})


def submit_corrections(demo: Demo) -> int:
    """Annotate every task with its true regions (label, colour, caption), as an annotator correcting the
    suggestions would; each annotation fires the webhook that syncs it into the corrections store."""
    tasks = sorted(demo.ls.tasks(demo.project), key=lambda t: t["id"])
    if len(tasks) != len(demo.answers):
        raise RuntimeError(f"{len(tasks)} tasks in the project, {len(demo.answers)} answers")
    for task, result in zip(tasks, demo.answers, strict=True):
        demo.ls.annotate(task["id"], result)
    return len(tasks)


def _login(page: Any, ls_url: str) -> None:
    page.goto(ls_url + "/user/login/")
    page.fill("input[name=email]", devserver.LS_EMAIL)
    page.fill("input[name=password]", devserver.LS_PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_load_state("networkidle")


def _open_task(page: Any, demo: Demo, task_id: int) -> None:
    page.goto(f"{demo.ls.url}/projects/{demo.project}/data?task={task_id}")
    page.locator(".lsf-outliner-item").first.wait_for(timeout=60_000)
    page.wait_for_timeout(1500)


def shot_prediction(page: Any, demo: Demo, out: Path, task_id: int) -> None:
    _open_task(page, demo, task_id)
    page.locator(".lsf-outliner-item").first.click()
    page.wait_for_timeout(1000)
    page.screenshot(path=str(out / "labeling-prediction.png"))


def shot_interactive(page: Any, demo: Demo, out: Path, task_id: int) -> None:
    """Auto-Annotation on, auto-accept off, the smart brush over the first region: the suggestion comes
    back with accept / reject."""
    _open_task(page, demo, task_id)
    page.get_by_text("Auto-Annotation").click()
    page.wait_for_timeout(500)
    page.locator(".lsf-tool").last.click()
    box = page.locator(".lsf-outliner-item").first.bounding_box()
    canvas = page.locator("canvas").first.bounding_box()
    if box is None or canvas is None:
        raise RuntimeError("the labeling canvas is not on the page")
    page.keyboard.press("1")
    x, y = canvas["x"] + canvas["width"] * 0.3, canvas["y"] + canvas["height"] * 0.3
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 25, y + 10, steps=8)
    page.mouse.up()
    page.wait_for_timeout(8000)
    page.screenshot(path=str(out / "interactive-suggestion.png"))


def shot_model_card(page: Any, demo: Demo, out: Path) -> None:
    """Settings -> Model: the connected backend's card. The page renders after its API calls, so wait for
    the card's title (the name the demo connected it under) rather than for the network to go idle."""
    page.goto(f"{demo.ls.url}/projects/{demo.project}/settings/ml")  # Settings -> Model (1.23's route)
    page.get_by_text("osprey", exact=True).first.wait_for(timeout=60_000)
    page.get_by_label("Machine learning model options").first.click()  # the card's menu: Start Training
    page.get_by_text("Start Training", exact=True).first.wait_for(timeout=10_000)
    page.wait_for_timeout(500)
    page.screenshot(path=str(out / "model-card.png"))


def shot_versions(page: Any, demo: Demo, out: Path) -> None:
    page.goto(f"{demo.ls.url}/projects/{demo.project}/settings/predictions")
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(2000)
    page.screenshot(path=str(out / "versions.png"))


def shot_after_retrain(page: Any, demo: Demo, out: Path) -> None:
    """Correct every task, Start Training, serve and retrieve the promoted version, show both versions."""
    submit_corrections(demo)
    version = retrain(demo)
    serve_version(demo, version)
    predict_all(demo, version=version)
    shot_versions(page, demo, out)


def take_screenshots(settings: Settings, out_dir: str, *, ls_port: int = 8080, backend_port: int = 9090,
                     images: int = 6, train: bool = True) -> int:
    executable = chromium_path()
    if executable is None:
        print("osprey demo --screenshots: no chromium on PATH (apt-get install chromium)", file=sys.stderr)
        return 2
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    demo = start_demo(settings, ls_port=ls_port, backend_port=backend_port,
                      images=max(images, TRAIN_IMAGES) if train else images, backend_env=TRAIN_ENV if train else None)
    failures: list[str] = []
    try:
        predict_all(demo)
        task_id = demo.ls.tasks(demo.project)[0]["id"]
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=executable, args=["--no-sandbox"])
            page = browser.new_page(viewport=VIEWPORT)
            _login(page, demo.ls.url)
            steps: list[tuple[str, Callable[[], None]]] = [
                ("labeling page with a prediction", lambda: shot_prediction(page, demo, out, task_id)),
                ("interactive suggestion", lambda: shot_interactive(page, demo, out, task_id)),
                ("model card", lambda: shot_model_card(page, demo, out)),
            ]
            if train:
                steps.append(("versions after a retrain", lambda: shot_after_retrain(page, demo, out)))
            for what, step in steps:
                try:
                    step()
                    print(f"screenshot: {what}", flush=True)
                except (PlaywrightError, TimeoutError, RuntimeError, httpx.HTTPError,
                        devserver.LabelStudioError) as exc:  # one failed picture must not lose the others
                    failures.append(f"{what}: {type(exc).__name__}: {exc}")
                    print(f"screenshot FAILED: {what}: {exc}", file=sys.stderr, flush=True)
            browser.close()
    finally:
        demo.stop()
    return 1 if failures else 0
