"""The nuclio function for self-hosted CVAT (deploy/cvat/): a `detector` in CVAT's serverless format.

CVAT's lambda manager POSTs `{"image": base64 frame, "threshold": optional}` and expects a JSON list of
`{"label", "type": "mask", "points", "mask", "confidence", "attributes": [{"name", "value"}]}`; `mask` is
the bbox-cropped binary mask flattened row-major (0/255) followed by `[xtl, ytl, xbr, ybr]` (inclusive), as
`to_cvat_mask` in CVAT's serverless/openvino/base/shared.py builds it; `points` is the outline polygon
(used when the user asks CVAT to convert masks to polygons). Attributes are only kept by CVAT when
declared in the function's `spec` annotation (`spec_annotation` makes it; function.yaml holds a copy that
the tests compare).

Configuration is by environment (function.yaml `env`): OSPREY_CVAT_LABELS (comma-separated),
OSPREY_CVAT_ATTRIBUTES (`color=red|blue;size=small|large`), OSPREY_CVAT_DESCRIBE (1/0), OSPREY_MODEL,
OSPREY_DEVICE, SAM_CHECKPOINT, SAM_MODEL_TYPE.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from backend.cvat.function import (
    DESCRIPTION_ATTRIBUTE,
    OspreyDetectionFunction,
    mask_polygon,
    parse_attributes,
)
from backend.service.tasks import Attribute


def spec_annotation(labels: Sequence[str], attributes: Sequence[Attribute], describe: bool = True) -> str:
    """The `metadata.annotations.spec` JSON string of function.yaml."""
    attrs = [{"name": a.name, "input_type": "select", "values": list(a.choices)} for a in attributes]
    if describe:
        attrs.append({"name": DESCRIPTION_ATTRIBUTE, "input_type": "text", "values": []})
    return json.dumps([{"id": i, "name": name, "type": "mask", "attributes": attrs}
                       for i, name in enumerate(labels)])


def to_cvat_mask(mask: np.ndarray, bbox: tuple[int, int, int, int]) -> list[int]:
    """Crop to `bbox` (x0, y0, x1, y1 exclusive), flatten row-major as 0/255, append the inclusive box."""
    x0, y0, x1, y1 = bbox
    flat = (mask[y0:y1, x0:x1].astype(np.uint8) * 255).ravel().tolist()
    return flat + [int(x0), int(y0), int(x1 - 1), int(y1 - 1)]


def from_env(env: dict[str, str] | None = None) -> OspreyDetectionFunction:
    from osprey_core import load_engine
    from osprey_core.proposals import build_proposer

    env = dict(os.environ if env is None else env)
    labels = [v for v in env.get("OSPREY_CVAT_LABELS", "").split(",") if v.strip()]
    device = env.get("OSPREY_DEVICE", "cpu")
    engine = load_engine(env.get("OSPREY_MODEL", "tiny"), device=device,
                         max_new_tokens=int(env.get("OSPREY_MAX_NEW_TOKENS", "64")))
    proposer = build_proposer(env.get("SAM_CHECKPOINT") or None, env.get("SAM_MODEL_TYPE", "vit_b"), device)
    return OspreyDetectionFunction(engine, proposer, labels, parse_attributes(env.get("OSPREY_CVAT_ATTRIBUTES", "")),
                                   describe=env.get("OSPREY_CVAT_DESCRIBE", "1") not in ("0", "false", ""))


def detections(function: OspreyDetectionFunction, image: Any, threshold: float | None) -> list[dict[str, Any]]:
    """CVAT's detector answer for one frame."""
    from backend.service.autolabel import autolabel_image

    rgb = np.asarray(image.convert("RGB"))
    result = autolabel_image(function.engine, rgb, function.plan, function.proposer, function.options, prefix="nuclio")
    masks = {s.id: p.region for s, p in zip(result.specs, result.proposals, strict=True)}
    out = []
    for answer in result.answers:
        cat = next((c for c in answer.categories if c[0] == "category"), None)
        if cat is None or (threshold is not None and cat[2] < threshold):
            continue
        region = masks[answer.sources[0]]
        attrs = [{"name": n, "value": str(v[0])} for n, v, _ in answer.attributes if v]
        attrs += [{"name": n, "value": t[:4096]} for n, t in answer.descriptions if n == DESCRIPTION_ATTRIBUTE]
        out.append({"confidence": f"{cat[2]:.4f}", "label": cat[1], "type": "mask",
                    "points": mask_polygon(region.mask), "mask": to_cvat_mask(region.mask, region.bbox),
                    "attributes": attrs})
    return out


def init_context(context: Any) -> None:
    """Once per nuclio worker: load the model and the proposer."""
    context.logger.info("loading Osprey for CVAT")
    context.user_data.function = from_env()
    context.logger.info("Osprey ready")


def handler(context: Any, event: Any) -> Any:
    from PIL import Image

    body = event.body if isinstance(event.body, dict) else json.loads(event.body)
    try:
        data = base64.b64decode(body["image"])
        image = Image.open(io.BytesIO(data))
        image.load()
        threshold = body.get("threshold")
        threshold = None if threshold in (None, "") else float(threshold)
    except (KeyError, TypeError, ValueError, OSError) as exc:
        return context.Response(body=json.dumps({"error": f"bad request: {type(exc).__name__}: {exc}"}),
                                headers={}, content_type="application/json", status_code=400)
    results = detections(context.user_data.function, image, threshold)
    return context.Response(body=json.dumps(results), headers={}, content_type="application/json", status_code=200)
