"""A local HTTP server implementing just the CVAT REST endpoints that cvat-sdk / cvat-cli touch here.

Why not a real CVAT: it needs Docker and several services (Django server, PostgreSQL, Redis, OPA, Traefik,
workers), which cannot run on this machine. So the tests drive the real cvat-sdk client (and the real
`cvat-cli` entry point) over real HTTP against this server, whose JSON bodies follow CVAT's OpenAPI
schema closely enough for the SDK's own typed deserialisation and request validation; only the state
these endpoints need (one task, its job, labels, frames and annotations) is kept, in memory.

Endpoints: GET /api/server/about; GET /api/tasks/{id}, /api/jobs/{id}; GET /api/labels?task_id|job_id;
GET /api/{tasks|jobs}/{id}/data/meta; GET /api/{tasks|jobs}/{id}/data?type=frame|chunk; GET, PUT and
PATCH ?action=create|update /api/{tasks|jobs}/{id}/annotations. Auth: `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import copy
import io
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np
from PIL import Image

TOKEN = "fake-cvat-token"
VERSION = "2.80.0"
DATE = "2026-01-01T00:00:00.000000Z"


class FakeCvat:
    """One task (id 1) with one job (id 7) over `frames` (HxWx3 uint8 arrays), `labels` as CVAT's
    label JSON (ids and attribute ids set), and `shapes` as CVAT's LabeledShape JSON."""

    def __init__(self, frames: list[np.ndarray], labels: list[dict[str, Any]],
                 shapes: list[dict[str, Any]] | None = None) -> None:
        self.frames = frames
        self.labels = labels
        self.annotations: dict[str, Any] = {"version": 0, "tags": [], "shapes": shapes or [], "tracks": []}
        self.requests: list[tuple[str, str]] = []
        self.bodies: list[Any] = []
        self._next_id = 1000
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeCvat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---- resources -----------------------------------------------------------------------------------

    def png(self, index: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(self.frames[index]).save(buf, format="PNG")
        return buf.getvalue()

    def frame_meta(self) -> list[dict[str, Any]]:
        return [{"width": int(f.shape[1]), "height": int(f.shape[0]), "name": f"frame_{i:03d}.png",
                 "related_files": 0, "has_related_context": False} for i, f in enumerate(self.frames)]

    def task(self) -> dict[str, Any]:
        n = len(self.frames)
        return {
            "id": 1, "name": "shapes", "project_id": None, "mode": "annotation", "owner": None, "assignee": None,
            "bug_tracker": "", "created_date": DATE, "updated_date": DATE, "overlap": 0, "segment_size": n,
            "status": "annotation", "data_chunk_size": n, "data_compressed_chunk_type": "imageset",
            "data_original_chunk_type": "imageset", "guide_id": None, "data": 1, "dimension": "2d",
            "subset": "", "organization": None, "target_storage": None, "source_storage": None,
            "size": n, "image_quality": 95, "url": f"{self.url}/api/tasks/1",
            "jobs": {"count": 1, "completed": 0, "validation": 0, "url": f"{self.url}/api/jobs?task_id=1"},
            "labels": {"url": f"{self.url}/api/labels?task_id=1"},
            "assignee_updated_date": None, "validation_mode": None, "consensus_enabled": False,
        }

    def job(self) -> dict[str, Any]:
        n = len(self.frames)
        return {
            "id": 7, "task_id": 1, "project_id": None, "assignee": None, "guide_id": None, "dimension": "2d",
            "data_compressed_chunk_type": "imageset", "data_original_chunk_type": "imageset",
            "data_chunk_size": n, "bug_tracker": None, "mode": "annotation", "frame_count": n,
            "start_frame": 0, "stop_frame": n - 1, "status": "annotation", "stage": "annotation",
            "state": "new", "type": "annotation", "organization": None, "target_storage": None,
            "source_storage": None, "created_date": DATE, "updated_date": DATE, "assignee_updated_date": None,
            "url": f"{self.url}/api/jobs/7", "parent_job_id": None, "consensus_replicas": 0,
            "issues": {"count": 0, "url": f"{self.url}/api/issues?job_id=7"},
            "labels": {"url": f"{self.url}/api/labels?job_id=7"},
        }

    def meta(self) -> dict[str, Any]:
        return {"chunks_updated_date": DATE, "image_quality": 95, "frames": self.frame_meta(),
                "deleted_frames": [], "start_frame": 0, "stop_frame": len(self.frames) - 1, "frame_filter": "",
                "chunk_size": len(self.frames), "size": len(self.frames), "included_frames": None}

    def chunk(self) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for i in range(len(self.frames)):
                zf.writestr(f"{i:06d}.png", self.png(i))
        return buf.getvalue()

    def patch(self, action: str, body: dict[str, Any]) -> None:
        with self._lock:
            shapes = self.annotations["shapes"]
            if action == "create":
                for s in body.get("shapes", []):
                    s = copy.deepcopy(s)
                    s.setdefault("id", self._next_id)
                    self._next_id += 1
                    shapes.append(_shape_defaults(s))
            elif action == "update":
                by_id = {s["id"]: i for i, s in enumerate(shapes)}
                for s in body.get("shapes", []):
                    if s.get("id") not in by_id:
                        raise KeyError(f"shape {s.get('id')} does not exist")
                    shapes[by_id[s["id"]]] = _shape_defaults(copy.deepcopy(s))
            else:
                raise KeyError(f"unsupported action {action}")
            self.annotations["version"] += 1

    # ---- HTTP ------------------------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: Any, content_type: str = "application/json") -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self, method: str) -> None:
                url = urlparse(self.path)
                q = {k: v[0] for k, v in parse_qs(url.query).items()}
                parts = [p for p in url.path.split("/") if p]
                fake.requests.append((method, url.path + (f"?{url.query}" if url.query else "")))
                if parts[:3] != ["api", "server", "about"] and \
                        self.headers.get("Authorization") not in (f"Bearer {TOKEN}", f"Token {TOKEN}"):
                    return self._send(401, {"detail": "Authentication credentials were not provided."})
                body = None
                if method in ("PATCH", "PUT", "POST"):
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                    fake.bodies.append((method, url.path, q, body))
                try:
                    return self._dispatch(method, parts, q, body)
                except KeyError as exc:
                    return self._send(400, {"detail": str(exc)})

            def _dispatch(self, method: str, parts: list[str], q: dict[str, str], body: Any) -> None:
                if parts == ["api", "server", "about"]:
                    return self._send(200, {"name": "Computer Vision Annotation Tool", "description": "fake",
                                            "version": VERSION, "logo_url": "", "subtitle": ""})
                if parts == ["api", "labels"]:
                    results = copy.deepcopy(fake.labels)
                    return self._send(200, {"count": len(results), "next": None, "previous": None,
                                            "results": results})
                if len(parts) >= 3 and parts[1] in ("tasks", "jobs"):
                    kind, ident = parts[1], int(parts[2])
                    if (kind, ident) not in (("tasks", 1), ("jobs", 7)):
                        return self._send(404, {"detail": "Not found."})
                    rest = parts[3:]
                    if not rest and method == "GET":
                        return self._send(200, fake.task() if kind == "tasks" else fake.job())
                    if rest == ["data", "meta"]:
                        return self._send(200, fake.meta())
                    if rest == ["data"]:
                        number = int(q.get("number", 0))
                        if q.get("type") == "frame":
                            return self._send(200, fake.png(number), "image/png")
                        if q.get("type") == "chunk":
                            return self._send(200, fake.chunk(), "application/zip")
                    if rest == ["annotations"]:
                        if method == "GET":
                            return self._send(200, fake.annotations)
                        if method == "PATCH":
                            fake.patch(q["action"], body)
                            return self._send(200, body)
                        if method == "PUT":
                            fake.annotations = {"version": 0, "tags": [], "shapes": [], "tracks": []}
                            fake.patch("create", body)
                            return self._send(200, body)
                return self._send(404, {"detail": f"not implemented by the fake: {method} {'/'.join(parts)}"})

            def do_GET(self) -> None:
                self._route("GET")

            def do_PATCH(self) -> None:
                self._route("PATCH")

            def do_PUT(self) -> None:
                self._route("PUT")

        return Handler


def _shape_defaults(s: dict[str, Any]) -> dict[str, Any]:
    s.setdefault("occluded", False)
    s.setdefault("outside", False)
    s.setdefault("z_order", 0)
    s.setdefault("rotation", 0.0)
    s.setdefault("group", 0)
    s.setdefault("source", "manual")
    s.setdefault("attributes", [])
    s.setdefault("elements", [])
    return s


def label(name: str, ident: int, attributes: list[dict[str, Any]] = (), type_: str = "any") -> dict[str, Any]:
    """CVAT's label JSON (what /api/labels returns)."""
    return {"id": ident, "name": name, "color": "#ff0000", "type": type_, "attributes": list(attributes),
            "sublabels": [], "has_parent": False, "parent_id": None, "task_id": 1, "project_id": None,
            "svg": ""}


def attribute(name: str, ident: int, input_type: str, values: list[str]) -> dict[str, Any]:
    return {"id": ident, "name": name, "mutable": False, "input_type": input_type,
            "default_value": values[0] if values else "", "values": values}
