"""Label Studio batch tasks without regions: the job plan that makes a worker auto-label them.

Before this, such tasks got a placeholder entry, which Label Studio logs as an error per task while still
counting it as "retrieved". Now, when auto-labeling is on (OSPREY_AUTOLABEL, default on; per project
`extra_params: {"autolabel": false | {...options}}` at /setup), the task becomes a job with no regions
and the plan's `autolabel` options; the worker proposes regions for the fetched image
(backend/service/autolabel.py `worker_specs`) and answers them like drawn ones. The proposals become
brush regions of the config's first brush tool, so configs without one keep the placeholder (there is no
tool the masks could be shown with) and say so.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from backend.labelstudio.config import PredictionPlan
from backend.service.autolabel import AutolabelOptions


def autolabel_plan(plan: PredictionPlan, neutral_plan: dict[str, Any], settings: Any,
                   extra_params: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The job plan for a region-less task, or None when auto-labeling is off or impossible."""
    options = AutolabelOptions.from_settings(settings, extra_params)
    brush = plan.brush_tool
    if not options.enabled or brush is None:
        return None
    meta = {"from_name": brush.name, "to_name": plan.image, "type": brush.type, "image_rotation": 0.0}
    return {**neutral_plan, "autolabel": replace(options, geometry="brush_rle", meta=meta).to_dict()}


def why_not(plan: PredictionPlan, settings: Any, extra_params: dict[str, Any] | None = None) -> str:
    """Why a region-less task is not auto-labeled (for the placeholder's message)."""
    if not AutolabelOptions.from_settings(settings, extra_params).enabled:
        return "auto-labeling is off (OSPREY_AUTOLABEL=false or extra_params.autolabel=false)"
    return "the labeling config has no Brush/BrushLabels tool to show proposed masks with"
