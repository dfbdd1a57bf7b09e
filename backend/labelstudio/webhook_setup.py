"""Give Label Studio's auto-created project webhook our secret, so the first corrections are not lost.

When an ML backend is connected, Label Studio 1.23 creates a project webhook to `<backend url>/webhook`
without credentials (protocol notes §2.8, §6); our /webhook answers it 401 until someone edits it by hand,
and the events of that time are lost (a sync repairs the store later, but no event triggers it). On /setup
(`ensure_webhook_secret`, in the background: /setup must answer within Label Studio's 3 s; once per project
and process after it succeeded, again at the next /setup while the webhook does not exist yet) we look the webhook up through the API with LABEL_STUDIO_API_KEY and add the
X-Osprey-Webhook-Secret header. Without an API key or a secret we log what the user must do instead.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from backend.auth import WEBHOOK_SECRET_HEADER
from backend.labelstudio.client import LabelStudioClient, LabelStudioError

logger = logging.getLogger(__name__)

_done: set[str] = set()
_lock = threading.Lock()


def project_id(project: Any) -> str | None:
    """Label Studio's /setup sends "<id>.<created timestamp>"; the id part, or None."""
    if project is None:
        return None
    head = str(project).split(".", 1)[0]
    return head if head.isdigit() else None


def _list(value: Any) -> list[dict]:
    if isinstance(value, dict):
        value = value.get("results", [])
    return [v for v in value or [] if isinstance(v, dict)]


def configure_webhook(client: LabelStudioClient, project: str, secret: str) -> list[str]:
    """Add the secret header to the project's webhooks that point at one of its ML backends' /webhook.
    Returns what was done, one line per webhook (for the log)."""
    backends = _list(client._request("GET", "/api/ml", params={"project": int(project)}).json())
    targets = {str(b.get("url", "")).rstrip("/") + "/webhook" for b in backends if b.get("url")}
    hooks = _list(client._request("GET", "/api/webhooks/", params={"project": int(project)}).json())
    done = []
    for hook in hooks:
        url = str(hook.get("url", ""))
        if url.split("?", 1)[0].rstrip("/") not in targets:
            continue
        headers = hook.get("headers") if isinstance(hook.get("headers"), dict) else {}
        if headers.get(WEBHOOK_SECRET_HEADER) == secret:
            done.append(f"webhook {hook.get('id')} ({url}) already carries {WEBHOOK_SECRET_HEADER}")
            continue
        client._request("PATCH", f"/api/webhooks/{hook['id']}/",
                        json={"url": url, "headers": {**headers, WEBHOOK_SECRET_HEADER: secret}})
        done.append(f"added {WEBHOOK_SECRET_HEADER} to webhook {hook.get('id')} ({url})")
    if not done:
        done.append(f"no webhook of project {project} points at its ML backends' /webhook ({sorted(targets)})")
    return done


def ensure_webhook_secret(settings: Any, project: Any, background: bool = True) -> threading.Thread | None:
    """Once per project: configure its webhook (API key set) or log how to (no key). Never raises."""
    pid = project_id(project)
    if pid is None:
        return None
    with _lock:
        key = f"{settings.label_studio_url}|{pid}"
        if key in _done:
            return None
        _done.add(key)
    if settings.osprey_webhook_secret is None:
        return None  # an open webhook needs nothing (auth.py warns about that setup at start)
    secret = settings.osprey_webhook_secret.get_secret_value()
    if not settings.label_studio_url or settings.label_studio_api_key is None:
        logger.warning(
            "project %s: Label Studio's project webhook carries no credentials and LABEL_STUDIO_API_KEY is not "
            "set, so this backend cannot add them: in Label Studio open Settings > Webhooks, edit the "
            "<backend>/webhook entry and add the header %s: <OSPREY_WEBHOOK_SECRET> (or append "
            "?secret=<OSPREY_WEBHOOK_SECRET> to its URL); until then annotation events are refused (401)",
            pid, WEBHOOK_SECRET_HEADER)
        return None

    def work() -> None:
        try:
            with LabelStudioClient.from_settings(settings) as client:
                lines = configure_webhook(client, pid, secret)
            for line in lines:
                logger.info("project %s: %s", pid, line)
            if lines[0].startswith("no webhook"):  # Label Studio creates it after the first /setup
                with _lock:
                    _done.discard(key)
        except (LabelStudioError, ValueError, OSError) as exc:
            with _lock:
                _done.discard(key)  # try again at the next /setup
            logger.warning("project %s: could not configure the webhook secret through the API (%s); add the "
                           "header %s by hand in Settings > Webhooks", pid, exc, WEBHOOK_SECRET_HEADER)

    if not background:
        work()
        return None
    thread = threading.Thread(target=work, daemon=True, name=f"osprey-webhook-setup-{pid}")
    thread.start()
    return thread
