"""Webhook events are kept slim and bounded (issue 6, defect 7), against the real server and Redis.

Label Studio's events carry whole tasks, results and label configs; the backend keeps only the action and
the ids a sync needs, so the stream under `noeviction` is bounded in bytes, and a huge `action` is refused
before it reaches a log line.
"""

from __future__ import annotations

import json

import httpx

from backend.labelstudio.routes import slim_event
from tests.backend.conftest import WEBHOOK_SECRET


def _post(stack, event) -> httpx.Response:
    return httpx.post(stack.base_url + "/webhook", params={"secret": WEBHOOK_SECRET}, json=event, timeout=30)


def _last_entry(stack) -> dict[bytes, bytes]:
    return stack.redis().xrevrange(f"{stack.prefix}:events", count=1)[0][1]


def test_big_event_is_stored_as_ids_only(stack):
    event = {"action": "ANNOTATION_UPDATED", "project": {"id": 7, "label_config": "<View>" + "x" * 900_000},
             "task": {"id": 11, "data": {"image": "y" * 500_000}},
             "annotation": {"id": 5, "result": [{"value": {"rle": list(range(20_000))}}]}}
    response = _post(stack, event)
    assert response.status_code == 201, response.text
    fields = _last_entry(stack)
    assert sum(len(k) + len(v) for k, v in fields.items()) < 1_000
    assert json.loads(fields[b"payload"]) == {"action": "ANNOTATION_UPDATED", "project": {"id": 7},
                                              "task": {"id": 11}, "annotation": {"id": 5}}
    assert fields[b"project_id"] == b"7"


def test_huge_action_is_refused_and_not_logged(stack):
    response = _post(stack, {"action": "A" * 1_500_000})
    assert response.status_code == 422
    assert "A" * 100 not in stack.tail(200)
    assert _post(stack, {"action": "PROJECT_UPDATED", "project": {"id": 1}}).status_code == 201


def test_thousands_of_ids_are_capped_and_ask_for_a_project_sync():
    slim = slim_event({"action": "ANNOTATIONS_DELETED", "project": {"id": 3},
                       "annotations": [{"id": i} for i in range(5_000)]})
    assert len(slim["annotations"]) == 1_000
    assert slim["sync_project"] is True
    assert len(json.dumps(slim)) < 40_000


def test_odd_ids_are_dropped_not_stored():
    slim = slim_event({"action": "ANNOTATION_CREATED", "project": {"id": "z" * 10_000}, "task": {"id": True},
                       "annotation": {"id": [1, 2]}})
    assert slim == {"action": "ANNOTATION_CREATED"}
