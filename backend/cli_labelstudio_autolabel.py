"""`osprey autolabel --labelstudio-project ID`: auto-label the region-less tasks of a Label Studio project
and store the answers as predictions (brush, polygon or box regions with scores, as the config's region
tool draws them: backend/labelstudio/autolabel.py `region_tool`) through its API.

The same path as "Retrieve Predictions" on region-less tasks (backend/labelstudio/autolabel.py), but run
from the command line in one process, for a whole project, without a queue. Resumable by construction:
a task that already has regions (annotations or predictions) or a prediction of this model version is
skipped, so a rerun after an interruption continues where it stopped. A task whose image cannot be
fetched or read is reported and skipped; one whose image has no objects gets an empty prediction, as from
"Retrieve Predictions" (`found_nothing` there says why).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from backend.errors import INPUT_ERRORS
from backend.service.autolabel import AutolabelError, AutolabelOptions, autolabel_image


def project_tasks(client: Any, project: int, page_size: int = 100) -> Iterator[dict[str, Any]]:
    """Every task of a project, page by page (GET /api/tasks)."""
    page = 1
    while True:
        data = client._request("GET", "/api/tasks", params={"project": project, "page": page,
                                                           "page_size": page_size, "fields": "all"}).json()
        tasks = data.get("tasks", []) if isinstance(data, dict) else data
        yield from tasks
        total = data.get("total") if isinstance(data, dict) else None
        if not tasks or len(tasks) < page_size or (total is not None and page * page_size >= total):
            return
        page += 1


def autolabel_project(args: Any, settings: Any, engine: Any, proposer: Any, options: AutolabelOptions,
                      err: Any) -> int:
    from tqdm import tqdm

    from backend.labelstudio.autolabel import NO_TOOL, tool_options
    from backend.labelstudio.client import LabelStudioClient, media_origins
    from backend.labelstudio.config import parse_label_config
    from backend.labelstudio.regions import select_result, task_image_url
    from backend.labelstudio.results import prediction_from_answers
    from backend.media.fetch import MediaFetcher

    client = LabelStudioClient.from_settings(settings)
    project = client.get_project(args.labelstudio_project)
    ls_plan = parse_label_config(project["label_config"])
    tooled = tool_options(ls_plan, options)
    if tooled is None:
        raise AutolabelError(f"project {args.labelstudio_project}: {NO_TOOL}")
    options = tooled
    plan = ls_plan.to_plan()
    media = MediaFetcher(settings, media_origins(settings))
    version = engine.model_version
    done = skipped = failed = 0
    tasks = list(project_tasks(client, args.labelstudio_project))
    for task in tqdm(tasks, unit="task", desc="autolabel", disable=args.no_progress or None, file=err):
        has_regions = bool(select_result(task, "both"))
        has_mine = any(p.get("model_version") == version for p in client.list_predictions(task["id"]))
        if has_regions or has_mine:
            skipped += 1
            continue
        try:
            image = media.load_image(task_image_url(task, ls_plan))
            result = autolabel_image(engine, np.asarray(image.convert("RGB")), plan, proposer, options,
                                     prefix=f"auto{task['id']}")
        except INPUT_ERRORS as exc:
            failed += 1
            print(f"task {task['id']} skipped: {type(exc).__name__}: {exc}", file=err)
            continue
        pred = prediction_from_answers(result.answers, result.specs, plan, version)
        client.create_prediction(task["id"], pred["result"], pred["score"], version)
        done += 1
        if not pred["result"]:
            print(f"task {task['id']}: no object found, an empty prediction stored", file=err)
    print(f"project {args.labelstudio_project}: {done} task(s) predicted, {skipped} skipped (regions or an "
          f"earlier prediction of {version}), {failed} failed", file=err)
    return 1 if failed and not done else 0
