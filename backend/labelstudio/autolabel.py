"""Label Studio batch tasks without regions: the job plan that makes a worker auto-label them.

Before this, such tasks got a placeholder entry, which Label Studio logs as an error per task while still
counting it as "retrieved". Now, when auto-labeling is on (OSPREY_AUTOLABEL, default on; per project
`extra_params: {"autolabel": false | {...options}}` at /setup), the task becomes a job with no regions
and the plan's `autolabel` options; the worker proposes regions for the fetched image
(backend/service/autolabel.py `worker_specs`) and answers them like drawn ones.

The proposals are shown with the config's region tool, in this order (`region_tool`): a brush (the mask
itself, as brush RLE), else a polygon (the mask's outer contour, simplified), else a rectangle (its
bounding box); within each, the `*Labels` tool before the plain one (which takes its category from the
`<Labels>` sets, split format). The model classifies the exact mask whichever tool shows it. Only a config
with none of these tools keeps the placeholder, and `why_not` says so.

An image on which the proposer finds no region gets a real, empty prediction (`result: []`, score null,
our model_version), in the /predict answer and by write-back alike (`found_nothing`). Label Studio 1.23
stores it without an error: `_get_predictions_from_ml_backend` needs only a `result` key, and prediction
validation (flag on) checks each item of the list, none here (protocol notes §2.4, §10.3; checked against
the real server in tests/e2e/test_autolabel.py). The task is then marked as predicted by this model
version, which is the truth -- the same proposer on the same image finds nothing again -- so Label Studio
does not ask again until the model version changes. A placeholder instead would be logged as an ERROR per
task on every "Retrieve Predictions", for ever. Drawn regions that come back with nothing to say keep
their placeholder (writeback.py): there the empty answer is not the task's answer.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from backend.labelstudio.config import PredictionPlan, RegionTool
from backend.service.autolabel import AutolabelOptions

# Label Studio geometry -> what the worker makes of a proposal mask for it (AutolabelOptions.shape).
TOOL_SHAPES = {"brush": "mask", "polygon": "polygon", "rectangle": "box"}


def region_tool(plan: PredictionPlan) -> RegionTool | None:
    """The tool that shows proposals: brush, else polygon, else rectangle; a `*Labels` tool first."""
    for geometry in TOOL_SHAPES:
        tools = [t for t in plan.tools if t.geometry == geometry]
        if tools:
            return next((t for t in tools if t.is_labels_tool), tools[0])
    return None


def tool_options(plan: PredictionPlan, options: AutolabelOptions) -> AutolabelOptions | None:
    """`options` set up for the config's region tool (None: it has none); also `osprey autolabel
    --labelstudio-project`."""
    tool = region_tool(plan)
    if tool is None:
        return None
    meta = {"from_name": tool.name, "to_name": plan.image, "type": tool.type, "image_rotation": 0.0}
    shape = TOOL_SHAPES[tool.geometry]
    return replace(options, geometry="brush_rle" if shape == "mask" else "rle", shape=shape, meta=meta,
                   categories=[c.control for c in plan.categories(tool.name, tool.type)], tags=[tool.name])


def autolabel_plan(plan: PredictionPlan, neutral_plan: dict[str, Any], settings: Any,
                   extra_params: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The job plan for a region-less task, or None when auto-labeling is off or impossible."""
    options = AutolabelOptions.from_settings(settings, extra_params)
    tooled = tool_options(plan, options) if options.enabled else None
    return None if tooled is None else {**neutral_plan, "autolabel": tooled.to_dict()}


NO_TOOL = ("the labeling config has no Brush, Polygon or Rectangle tool (or their *Labels forms) on the image "
           "to show proposed regions with")


def why_not(plan: PredictionPlan, settings: Any, extra_params: dict[str, Any] | None = None) -> str:
    """Why a region-less task is not auto-labeled (for the placeholder's message)."""
    if not AutolabelOptions.from_settings(settings, extra_params).enabled:
        return "auto-labeling is off (OSPREY_AUTOLABEL=false or extra_params.autolabel=false)"
    return NO_TOOL


def found_nothing(output: dict[str, Any]) -> bool:
    """A successful auto-labeling job output whose proposer found no region: answered by an empty prediction."""
    return bool(output.get("ok")) and not output.get("regions") and bool((output.get("plan") or {}).get("autolabel"))
