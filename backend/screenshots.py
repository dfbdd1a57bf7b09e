"""`make screenshots` (`osprey demo --screenshots DIR`): the README's pictures, taken in a real browser.

Starts the demo (backend/demo.py), has the backend predict every task, then drives Debian's `chromium`
through Playwright (the system executable, never `playwright install`) over Label Studio: the labeling page
with our prediction selected (region, label + score, colour, caption), an interactive suggestion drawn with
Auto-Annotation on, the model card, and the versions after a retrain. Each picture is a separate step: one
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


def chromium_path() -> str | None:
    """Debian's chromium (`apt-get install chromium`), or None."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _current_version(demo: Demo) -> str:
    return httpx.get(demo.backend_url + "/versions", auth=(DEMO_USER, DEMO_PASSWORD), timeout=10).json()["current"]


def predict_all(demo: Demo, timeout_s: float = 900) -> str:
    """Retrieve Predictions on every task and wait until each has one of the served version."""
    version = _current_version(demo)
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
    """"Start Training" (`POST /api/ml/{id}/train`); wait until a new version is served."""
    before = _current_version(demo)
    ml = demo.ls.backends(demo.project)[0]
    demo.ls.call("POST", f"/api/ml/{ml['id']}/train", expect=(200, 201))
    deadline = time.monotonic() + timeout_s
    while (now := _current_version(demo)) == before:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no new version within {timeout_s:.0f} s of Start Training (still {before})")
        time.sleep(5)
    return now


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
    demo = start_demo(settings, ls_port=ls_port, backend_port=backend_port, images=images)
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
                steps.append(("versions after a retrain", lambda: (retrain(demo), shot_versions(page, demo, out))))
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
