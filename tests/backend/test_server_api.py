"""The HTTP API as Label Studio 1.23 calls it, over real HTTP against `osprey serve` in a subprocess, with a
real `osprey worker` (tiny model) and the real Redis on 127.0.0.1:6379. Payloads follow the protocol notes."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

NOTHING_TO_PREDICT = """<View>
  <Image name="image" value="$image"/>
  <Choices name="scene" toName="image"><Choice value="indoor"/><Choice value="outdoor"/></Choices>
</View>"""


def labels_of(config: str, control: str) -> set[str]:
    from backend.labelstudio.config import parse_label_config

    plan = parse_label_config(config)
    tool = plan.tool(control)
    if tool is not None:
        return set(tool.labels)
    return set(plan.label_set(control).labels)


def test_openapi_schema_documents_the_api_behind_auth(stack):
    schema = stack.get("/openapi.json").json()
    assert {"/health", "/setup", "/predict", "/webhook", "/versions", "/metrics"} <= set(schema["paths"])
    assert stack.get("/docs").status_code == 200


def test_health_needs_no_auth_and_is_v2_shaped(stack):
    response = httpx.get(stack.base_url + "/health", timeout=5)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "UP"
    assert body["model_class"] == "OspreyRegionModel"


@pytest.mark.parametrize("path,method", [("/predict", "POST"), ("/setup", "POST"), ("/versions", "GET"),
                                         ("/metrics", "GET"), ("/openapi.json", "GET"), ("/docs", "GET")])
def test_every_other_endpoint_needs_auth(stack, path, method):
    anonymous = httpx.request(method, stack.base_url + path, json={}, timeout=5)
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"].startswith("Basic")
    wrong = httpx.request(method, stack.base_url + path, json={}, auth=("ls-backend", "wrong"), timeout=5)
    assert wrong.status_code == 401
    assert "authentication required" in wrong.json()["detail"]


@pytest.mark.parametrize("extra_params", [None, '{"threshold": 0.5}', {"threshold": 0.5}])
def test_setup_answers_the_version_workers_serve(stack, payloads, configs, extra_params):
    response = stack.post("/setup", payloads.setup(configs["brush_attributes"], extra_params))
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model_version"] == stack.model_version() and answer["model_version"].startswith("tiny-")
    # what the score means, as the worker's engine says (a random tiny model: uncalibrated, plain sums)
    assert answer["score"] == {"method": "softmax over candidate sequence log-likelihoods", "temperature": 1.0,
                               "calibrated": False, "length_normalized": False, "calibration": None}, answer
    assert set(answer) == {"model_version", "score"}


def test_setup_with_nothing_to_predict_is_a_clear_4xx(stack, payloads):
    response = stack.post("/setup", payloads.setup(NOTHING_TO_PREDICT))
    assert response.status_code == 422
    assert "no region control points at an <Image>" in response.json()["detail"]


@pytest.mark.parametrize("kind", ["keypoint", "rectangle", "polygon", "brush"])
def test_interactive_fills_in_the_drawn_region(stack, payloads, configs, kind):
    config_name, control, item = {
        "keypoint": ("keypoint_sam", "point", payloads.keypoint()),
        "rectangle": ("keypoint_sam", "rect", payloads.rectangle()),
        "polygon": ("polygon_rectangle", "part", payloads.polygon()),
        "brush": ("brush_attributes", "category", payloads.brush()),
    }[kind]
    config = configs[config_name]
    version = stack.post("/setup", payloads.setup(config)).json()["model_version"]
    response = stack.post("/predict", payloads.predict([payloads.task(10)], config, {"result": [item]}))
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 1  # Label Studio shows results[0]
    prediction = results[0]
    assert prediction["model_version"] == version
    items = prediction["result"]
    assert {i["id"] for i in items} == {item["id"]}  # every suggestion is attached to the drawn region
    region = next(i for i in items if i["from_name"] == control)
    assert region["type"] == item["type"]
    assert region["value"][item["type"]][0] in labels_of(config, control)
    assert 0.0 <= region["score"] <= 1.0
    assert (region["original_width"], region["original_height"]) == (64, 48)
    per_region = {i["from_name"] for i in items} - {control}
    expected = {"keypoint_sam": {"caption"}, "polygon_rectangle": {"occluded", "description"},
                "brush_attributes": {"color", "size", "caption", "detailed_description"}}[config_name]
    assert per_region == expected
    if kind == "brush":
        assert region["value"]["format"] == "rle" and region["value"]["rle"]


def test_batch_returns_one_entry_per_task_in_order(stack, payloads, configs):
    config = configs["polygon_rectangle"]
    version = stack.post("/setup", payloads.setup(config)).json()["model_version"]
    tasks = [
        payloads.task(101, annotations=[payloads.annotation(payloads.split_rectangle("r1"))]),
        payloads.task(102, annotations=[payloads.annotation([payloads.polygon("p1")])]),
        payloads.task(103),  # no annotation: auto-labeled with the config's polygon tool
    ]
    response = stack.post("/predict", payloads.predict(tasks, config))
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 3
    first, second, third = results
    assert {i["id"] for i in first["result"]} == {"r1"}
    assert {(i["from_name"], i["type"]) for i in first["result"]} >= {("box", "rectangle"), ("object", "labels")}
    object_label = next(i for i in first["result"] if i["from_name"] == "object")["value"]["labels"][0]
    assert object_label in labels_of(config, "object")
    assert {i["id"] for i in second["result"]} == {"p1"}
    assert first["model_version"] == second["model_version"] == version
    # Task 103 nobody drew on: the proposals as PolygonLabels polygons (no brush in this config).
    assert "osprey_status" not in third and third["model_version"] == version
    polygons = [i for i in third["result"] if i["type"] == "polygonlabels"]
    assert polygons and all(i["from_name"] == "part" and len(i["value"]["points"]) >= 3 and 0 < i["score"] <= 1
                            for i in polygons)
    assert {i["from_name"] for i in third["result"]} == {"part", "occluded", "description"}


KEYPOINTS_ONLY = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="point" toName="image"><Label value="cat"/><Label value="dog"/></KeyPointLabels>
</View>"""


def test_batch_region_less_tasks_empty_image_and_no_region_tool(stack, payloads, configs):
    """An image without objects: a real empty prediction (Label Studio stores it without an error), not a
    placeholder; a config without a brush, polygon or rectangle tool: a placeholder that says why."""
    from PIL import Image

    Image.new("RGB", (64, 48), (128, 128, 128)).save(stack.workdir / "files" / "imgs" / "blank.png")
    version = stack.post("/setup", payloads.setup(configs["polygon_rectangle"])).json()["model_version"]
    blank = payloads.task(111, image="/data/local-files/?d=imgs/blank.png")
    response = stack.post("/predict", payloads.predict([blank], configs["polygon_rectangle"]))
    assert response.status_code == 200, response.text
    assert response.json()["results"] == [{"result": [], "score": None, "model_version": version}]

    response = stack.post("/predict", payloads.predict([payloads.task(112)], KEYPOINTS_ONLY))
    [entry] = response.json()["results"]
    assert "result" not in entry and entry["osprey_status"] == "no_regions"
    assert "no Brush, Polygon or Rectangle tool" in entry["message"]


def test_same_predict_twice_does_the_work_once(stack, payloads, configs):
    config = configs["polygon_rectangle"]
    body = payloads.predict([payloads.task(201, annotations=[payloads.annotation([payloads.polygon("q1")])])], config)
    before = sum(stack.job_runs().values())
    first = stack.post("/predict", body)
    after_first = sum(stack.job_runs().values())
    second = stack.post("/predict", body)
    after_second = sum(stack.job_runs().values())
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert after_first - before == 1
    assert after_second == after_first


def test_concurrent_identical_interactive_requests_share_one_job(stack, payloads, configs):
    config = configs["keypoint_sam"]
    body = payloads.predict([payloads.task(11)], config, {"result": [payloads.keypoint(x=12.5, y=17.5, region_id="cc1")]})
    before = sum(stack.job_runs().values())
    with ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(lambda _: stack.post("/predict", body), range(3)))
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert responses[0].json() == responses[1].json() == responses[2].json()
    assert sum(stack.job_runs().values()) - before == 1


def test_empty_interactive_context_answers_one_empty_suggestion(stack, payloads, configs):
    config = configs["keypoint_sam"]
    response = stack.post("/predict", payloads.predict([payloads.task(12)], config, {"result": []}))
    assert response.status_code == 200
    [entry] = response.json()["results"]
    assert entry["result"] == [] and entry["model_version"] == stack.model_version()


WEBHOOK_EVENTS = [
    {"action": "ANNOTATION_CREATED", "annotation": {"id": 7, "result": [], "task": 1, "was_cancelled": False},
     "task": {"id": 1, "data": {"image": "/data/upload/1/a.png"}}, "project": {"id": 1, "label_config": "<View/>"}},
    {"action": "ANNOTATION_UPDATED", "annotation": {"id": 7, "result": []}, "task": {"id": 1}, "project": {"id": 1}},
    {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 7}], "project": {"id": 1}},
    {"action": "TASKS_CREATED", "tasks": [{"id": 2}], "project": {"id": 1}},
    {"action": "PROJECT_UPDATED", "project": {"id": 1, "title": "p"}},
    {"action": "START_TRAINING", "project": {"id": 1, "label_config": "<View/>"}},
]


def test_webhook_records_label_studio_events(stack):
    url = stack.base_url + "/webhook"
    for event in WEBHOOK_EVENTS:
        # Label Studio's auto-created webhook carries no credentials: the secret is in the URL.
        response = httpx.post(url, params={"secret": "hook-secret-456"}, json=event, timeout=5)
        assert response.status_code == 201, response.text
        assert response.json()["action"] == event["action"]
    entries = stack.redis().xrange(f"{stack.prefix}:events")
    recorded = [fields[b"action"].decode() for _, fields in entries[-len(WEBHOOK_EVENTS):]]
    assert recorded == [e["action"] for e in WEBHOOK_EVENTS]
    last_payload = json.loads(entries[-1][1][b"payload"])
    assert last_payload["project"]["id"] == 1


def test_webhook_needs_its_secret(stack):
    url = stack.base_url + "/webhook"
    assert httpx.post(url, json=WEBHOOK_EVENTS[0], timeout=5).status_code == 401
    assert httpx.post(url, params={"secret": "nope"}, json=WEBHOOK_EVENTS[0], timeout=5).status_code == 403


def test_versions_lists_the_served_model(stack):
    response = stack.get("/versions")
    assert response.status_code == 200
    body = response.json()
    assert body["current"] == stack.model_version()
    assert body["current"] in body["versions"]


def test_metrics_are_prometheus_text(stack, payloads, configs):
    stack.post("/setup", payloads.setup(configs["keypoint_sam"]))
    response = stack.get("/metrics")
    assert response.status_code == 200
    text = response.text
    assert 'osprey_http_requests_total{method="POST",path="/setup",status="200"}' in text
    assert 'osprey_queue_depth{queue="interactive"}' in text
    assert "osprey_workers 1.0" in text
    assert "osprey_queue_up 1.0" in text


def test_worker_reloads_when_a_new_model_version_is_announced(stack, payloads, configs, tmp_path):
    """What model promotion does: write the new model's directory to Redis; workers reload before the next job."""
    import torch

    from backend.queue.jobs import JobQueue
    from backend.settings import Settings
    from osprey_core import load_engine
    from osprey_core.checkpoint import save_checkpoint

    engine = load_engine("tiny")
    with torch.no_grad():
        next(engine.model.parameters()).add_(0.05)  # "fine-tuned": other weights, another version
    promoted = save_checkpoint(engine.model, engine.tokenizer, tmp_path / "promoted")
    queue = JobQueue(stack.redis(), Settings(osprey_redis_prefix=stack.prefix))
    config = configs["keypoint_sam"]
    before = stack.model_version()

    def click(task_id: int) -> dict:
        context = {"result": [payloads.keypoint(x=20.0 + task_id % 50, region_id=f"v{task_id}")]}
        response = stack.post("/predict", payloads.predict([payloads.task(task_id)], config, context))
        assert response.status_code == 200, response.text
        return response.json()["results"][0]

    queue.announce_model_source(str(promoted))
    try:
        after = click(801)["model_version"]
        assert after != before and after == load_engine(str(promoted)).model_version
        assert stack.post("/setup", payloads.setup(config)).json()["model_version"] == after
        assert {before, after} <= set(stack.get("/versions").json()["versions"])
    finally:
        queue.announce_model_source("tiny")
        assert click(802)["model_version"] == before
