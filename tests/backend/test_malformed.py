"""Malformed input of every kind gets a 4xx with a clear message, never a 5xx, and the server and the
worker keep serving. Real HTTP, real worker (media errors are found by the worker, which reads the files),
real Redis on 127.0.0.1:6379."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import httpx
import pytest

W, H = 64, 48


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares width x height pixels with a tiny (truncated) image stream: a decompression
    bomb as far as any header check can tell, written in microseconds."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))


@pytest.fixture(scope="module", autouse=True)
def bad_files(stack):
    png_header_only(stack.files / "imgs" / "huge.png", 20000, 20000)
    (stack.files / "imgs" / "notes.png").write_text("this is not an image, just text with a .png name\n")
    (stack.files / "secret.txt").write_text("outside imgs\n")


def interactive(payloads, configs, item: dict | None = None, task: dict | None = None, config: str = "keypoint_sam",
                context: Any = "default", tasks: list | None = None) -> dict:
    if context == "default":
        context = {"result": [item if item is not None else payloads.keypoint()]}
    return payloads.predict(tasks if tasks is not None else [task or payloads.task(1)], configs[config], context)


def with_image(payloads, image: str) -> dict:
    return payloads.task(1, image=image)


# Each case: (id, method, path, body builder -> json or bytes, expected status, message fragment).
CASES: list[tuple[str, str, str, Any, int, str]] = [
    ("bad-json", "POST", "/predict", lambda p, c: b'{"tasks": [', 400, "not valid JSON"),
    ("body-is-a-list", "POST", "/predict", lambda p, c: [1, 2], 422, "invalid request"),
    ("missing-tasks", "POST", "/predict", lambda p, c: {"label_config": c["keypoint_sam"]}, 422, "tasks: Field required"),
    ("tasks-not-a-list", "POST", "/predict", lambda p, c: {"tasks": "1", "label_config": c["keypoint_sam"]}, 422,
     "tasks"),
    ("task-without-id", "POST", "/predict",
     lambda p, c: p.predict([{"data": {"image": p.image_url}}], c["keypoint_sam"], {"result": [p.keypoint()]}), 422,
     "integer 'id'"),
    ("no-label-config", "POST", "/predict", lambda p, c: {"tasks": [p.task(1)], "project": "99.1"}, 422,
     "label_config is missing"),
    ("label-config-not-xml", "POST", "/predict", lambda p, c: p.predict([p.task(1)], "<View><Image", None), 422,
     "not valid XML"),
    ("label-config-without-image", "POST", "/predict",
     lambda p, c: p.predict([p.task(1)], '<View><Text name="t" value="$text"/></View>', None), 422, "no <Image> tag"),
    ("unknown-control-name", "POST", "/predict",
     lambda p, c: interactive(p, c, {**p.keypoint(), "from_name": "no_such_tool"}), 422, "unknown control"),
    ("wrong-brush-rle-length", "POST", "/predict",
     lambda p, c: interactive(p, c, p.brush(rle=_rle_10x10()), config="brush_attributes"), 422,
     "width*height*4"),
    ("corrupt-brush-rle", "POST", "/predict",
     lambda p, c: interactive(p, c, p.brush(rle=[0, 0, 48, 0, 57]), config="brush_attributes"), 422,
     "brush RLE is too short"),
    ("keypoint-x-not-a-number", "POST", "/predict",
     lambda p, c: interactive(p, c, {**p.keypoint(), "value": {"x": "left", "y": 4, "keypointlabels": ["cat"]}}),
     422, "region 'fBWv1t0S2L'"),
    ("negative-image-size", "POST", "/predict",
     lambda p, c: interactive(p, c, {**p.keypoint(), "original_width": -64}), 422, "original_width"),
    ("polygon-with-one-point", "POST", "/predict",
     lambda p, c: interactive(p, c, {**p.polygon(), "value": {"points": [[1, 2]], "polygonlabels": ["door"]}},
                              config="polygon_rectangle"), 422, "region 'Pq98zx76wv'"),
    ("context-not-an-object", "POST", "/predict", lambda p, c: interactive(p, c, context="click"), 422,
     "params.context must be an object"),
    ("interactive-with-two-tasks", "POST", "/predict",
     lambda p, c: interactive(p, c, tasks=[p.task(1), p.task(2)]), 422, "exactly one task"),
    ("missing-image-in-task-data", "POST", "/predict",
     lambda p, c: interactive(p, c, task={"id": 1, "data": {"picture": "x.png"}}), 422, "no image URL"),
    ("url-to-disallowed-host", "POST", "/predict",
     lambda p, c: interactive(p, c, task=with_image(p, "http://169.254.169.254/latest/meta-data/")), 403,
     "not allowed"),
    ("local-files-path-traversal", "POST", "/predict",
     lambda p, c: interactive(p, c, task=with_image(p, "/data/local-files/?d=../../../../etc/passwd")), 403,
     "escapes LOCAL_FILES_DOCUMENT_ROOT"),
    ("upload-path-traversal", "POST", "/predict",
     lambda p, c: interactive(p, c, task=with_image(p, "/data/upload/../../etc/passwd")), 403, "contains '..'"),
    ("cloud-uri", "POST", "/predict",
     lambda p, c: interactive(p, c, task=with_image(p, "s3://bucket/a.png")), 400, "unsupported scheme"),
    ("missing-image-file", "POST", "/predict",
     lambda p, c: interactive(p, c, task=with_image(p, "/data/local-files/?d=imgs/nope.png")), 404, "not found"),
    ("20000x20000-png", "POST", "/predict",
     lambda p, c: interactive(p, c, task=with_image(p, "/data/local-files/?d=imgs/huge.png")), 413, "too large"),
    ("not-an-image", "POST", "/predict",
     lambda p, c: interactive(p, c, task=with_image(p, "/data/local-files/?d=imgs/notes.png")), 415,
     "not a supported image"),
    ("region-larger-than-image", "POST", "/predict",
     lambda p, c: interactive(p, c, {**p.keypoint(), "original_width": 640, "original_height": 480}), 422,
     "640x480"),
    ("batch-where-no-task-is-usable", "POST", "/predict",
     lambda p, c: p.predict([{"id": 5, "data": {}}, {"id": 6, "data": {"image": ""}}], c["polygon_rectangle"]), 422,
     "no task can be predicted"),
    ("setup-without-schema", "POST", "/setup", lambda p, c: {"project": "1.1"}, 422, "schema: Field required"),
    ("setup-extra-params-not-json", "POST", "/setup", lambda p, c: p.setup(c["keypoint_sam"], "{not json"), 422,
     "extra_params is not valid JSON"),
    ("body-over-the-size-limit", "POST", "/predict", lambda p, c: b"[" + b" " * (3 * 1024 * 1024) + b"]", 413,
     "OSPREY_MAX_REQUEST_BYTES"),
]

WEBHOOK_CASES = [
    ("webhook-bad-json", b"{action", 400, "not valid JSON"),
    ("webhook-without-action", {"project": {"id": 1}}, 422, "action: Field required"),
]


def _rle_10x10() -> list[int]:
    import numpy as np
    from label_studio_sdk.converter.brush import mask2rle

    mask = np.zeros((10, 10), dtype=np.uint8)
    mask[2:5, 2:5] = 255
    return [int(v) for v in mask2rle(mask)]


def _send(stack, method: str, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    if isinstance(body, bytes):
        return stack.client().request(method, path, content=body, headers={"Content-Type": "application/json"},
                                      **kwargs)
    return stack.client().request(method, path, json=body, **kwargs)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_request_gets_a_clear_4xx(stack, payloads, configs, case):
    _, method, path, build, status, fragment = case
    response = _send(stack, method, path, build(payloads, configs))
    assert response.status_code == status, response.text
    assert fragment in response.json()["detail"]


@pytest.mark.parametrize("case", WEBHOOK_CASES, ids=[c[0] for c in WEBHOOK_CASES])
def test_malformed_webhook_gets_a_clear_4xx(stack, case):
    _, body, status, fragment = case
    response = _send(stack, "POST", "/webhook", body, params={"secret": "hook-secret-456"})
    assert response.status_code == status, response.text
    assert fragment in response.json()["detail"]


def test_bad_task_in_a_batch_does_not_sink_the_others(stack, payloads, configs):
    config = configs["polygon_rectangle"]
    good = payloads.task(301, annotations=[payloads.annotation([payloads.polygon("g1")])])
    bad = payloads.task(302, image="/data/local-files/?d=imgs/notes.png",
                        annotations=[payloads.annotation([payloads.polygon("g2")])])
    response = stack.post("/predict", payloads.predict([good, bad], config))
    assert response.status_code == 200
    first, second = response.json()["results"]
    assert {i["id"] for i in first["result"]} == {"g1"}
    assert "result" not in second and "not a supported image" in second["message"]


def test_server_and_worker_still_serve_after_all_that(stack, payloads, configs):
    config = configs["keypoint_sam"]
    body = payloads.predict([payloads.task(400)], config, {"result": [payloads.keypoint(x=55.0, y=25.0, region_id="ok1")]})
    response = stack.post("/predict", body)
    assert response.status_code == 200, response.text
    [prediction] = response.json()["results"]
    assert {i["id"] for i in prediction["result"]} == {"ok1"}
    assert all(proc.poll() is None for proc in [stack.server, *stack.workers])
    metrics = stack.get("/metrics").text
    assert 'status="5' not in metrics  # not a single 5xx answered during the whole module
