"""The ``osprey`` command.

    osprey serve    the HTTP API Label Studio calls (no model in this process)
    osprey worker   a GPU/CPU worker: loads the model once, runs queued jobs (one per GPU);
                    `--queues writeback` makes a light one (no model) for deliveries to Label Studio
    osprey run      everything on one machine: the embedded Redis (unless REDIS_URL is set), a
                    supervised worker (restarted with backoff when it dies), a light write-back worker
                    when write-back is configured, and the server; Ctrl-C or SIGTERM stops them all
    osprey predict  offline prediction with the core (osprey_core.cli)

Settings come from environment variables (backend/settings.py); a few have flags.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

from backend.settings import Settings, get_settings

logger = logging.getLogger("osprey")

WORKER_STOP_TIMEOUT_S = 15.0  # a warm shutdown lets the running job finish


def _setup_logging(settings: Settings) -> None:
    from backend.auth import install_log_redaction

    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s")
    install_log_redaction(settings)


def serve(settings: Settings) -> None:
    """Run the HTTP server in this process until SIGINT/SIGTERM (request deadlines: backend/httpserver.py)."""
    import uvicorn

    from backend.app import create_app
    from backend.httpserver import server_config

    uvicorn.Server(server_config(create_app(settings), settings)).run()


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if `osprey run` dies without cleaning up (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_worker_process(env: dict[str, str], args: Sequence[str] = ()) -> subprocess.Popen:
    """`osprey worker` as a child in its own session: Ctrl-C reaches `osprey run`, which stops it."""
    return subprocess.Popen([sys.executable, "-m", "backend.cli", "worker", *args], env=env,
                            start_new_session=True, preexec_fn=_die_with_parent)


def stop_process(process: subprocess.Popen, timeout_s: float = WORKER_STOP_TIMEOUT_S) -> None:
    """SIGTERM (RQ's warm shutdown: finish the current job), then SIGKILL after `timeout_s`."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        logger.warning("worker %d did not stop in %.0f s; killing it", process.pid, timeout_s)
        process.kill()
        process.wait()


class _Stop(Exception):
    """Raised by the SIGTERM handler of `osprey run` so that cleanup runs."""


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop()


def run_all(settings: Settings) -> None:
    """Embedded Redis (unless REDIS_URL) + supervised worker subprocesses + the server, stopped together."""
    from backend.queue.jobs import JobQueue
    from backend.queue.redis import EmbeddedRedis, connect
    from backend.queue.supervisor import Child, Supervisor

    # uvicorn restores this handler after its own shutdown and re-raises SIGTERM into it,
    # so cleanup below always runs; Ctrl-C arrives as KeyboardInterrupt the same way.
    signal.signal(signal.SIGTERM, _raise_stop)
    embedded = None
    supervisor = None
    redis_watch_stop = threading.Event()
    try:
        if settings.redis_url:
            url = settings.redis_url
        else:
            embedded = EmbeddedRedis(settings.model_dir).start()
            embedded.watch(redis_watch_stop)  # restarted if it dies while we run
            url = embedded.url
        env = {**os.environ, "REDIS_URL": url}
        if not os.environ.get("OSPREY_MODEL"):  # the embedded default: the demo model (training/demo_model.py)
            from training.demo_model import DEMO_TRAINING_ENV, DemoModelError, default_model_source

            try:
                env["OSPREY_MODEL"] = default_model_source(settings.model_dir)
                env |= {k: v for k, v in DEMO_TRAINING_ENV.items() if k not in os.environ}
                settings = settings.model_copy(update={"osprey_model": env["OSPREY_MODEL"]})
            except DemoModelError as exc:
                logger.warning("%s; serving %s", exc, settings.osprey_model)
        base = f"osprey-{socket.gethostname()}-{os.getpid()}"
        children = [Child(f"{base}-w0", ["--queues", "interactive,batch", "--name", f"{base}-w0"])]
        if settings.label_studio_url and settings.label_studio_api_key is not None:
            children.append(Child(f"{base}-wb", ["--queues", "writeback", "--name", f"{base}-wb"]))
        # The learning loop: syncs and training runs, plus the schedule (training/schedule.py).
        children.append(Child(f"{base}-train", ["--queues", "training", "--schedule", "--name", f"{base}-train"]))
        supervisor = Supervisor(
            children, spawn=lambda args: start_worker_process(env, args), stop=stop_process,
            queue=JobQueue(connect(url), settings), backoff_s=settings.osprey_worker_restart_backoff_s,
            max_fast_crashes=settings.osprey_worker_max_fast_crashes, fast_crash_s=settings.osprey_worker_fast_crash_s,
            stale_after_s=3.0 * settings.osprey_worker_heartbeat_s)
        supervisor.start()
        logger.info("worker processes %s started; serving on http://%s:%d", supervisor.pids(), settings.host,
                    settings.port)
        print(connect_help(settings), flush=True)
        serve(settings.model_copy(update={"redis_url": url}))
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # cleanup is bounded; do not abort it halfway
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        logger.info("shutting down")
        if supervisor is not None:
            supervisor.stop()
        redis_watch_stop.set()
        if embedded is not None:
            embedded.stop()


def connect_help(settings: Settings) -> str:
    """How to connect Label Studio to this backend (printed by `osprey run`)."""
    host = "localhost" if settings.host in ("0.0.0.0", "127.0.0.1", "::") else settings.host
    if settings.basic_auth_user:
        auth = f"basic auth: user {settings.basic_auth_user!r} and the BASIC_AUTH_PASS password"
    elif settings.osprey_api_token is not None:
        auth = "auth: the OSPREY_API_TOKEN bearer token (Label Studio: use basic auth instead, BASIC_AUTH_USER/PASS)"
    else:
        auth = "auth: none (set BASIC_AUTH_USER / BASIC_AUTH_PASS to require it)"
    return (f"\nOsprey serves {settings.osprey_model}\n"
            f"Connect Label Studio: project Settings -> Model -> Connect Model, URL http://{host}:{settings.port}, "
            f"{auth}; turn on 'Interactive preannotations'.\n"
            "Example labeling config: deploy/labelstudio/demo_shapes.xml (shapes: category, colour, caption).\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="osprey", description="Osprey region labels behind Label Studio.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in (("serve", "run the HTTP API (Label Studio's ML backend URL)"),
                            ("run", "embedded Redis + one worker + the HTTP API, in one command")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--host", help="bind address (HOST, default 0.0.0.0)")
        p.add_argument("--port", type=int, help="port (PORT, default 9090)")
    p = sub.add_parser("worker", help="load the model once and run queued prediction jobs")
    p.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    p.add_argument("--name", help="worker name (default osprey-<host>-<pid>)")
    p.add_argument("--queues", default="interactive,batch,writeback",
                   help="comma-separated queues to serve, in this priority (default interactive,batch,writeback; "
                        "`writeback` alone: a light worker without a model; `training` alone: syncs and "
                        "training runs)")
    p.add_argument("--schedule", action="store_true",
                   help="with --queues training: also run the retraining schedule (as `osprey schedule`)")
    sub.add_parser("schedule", help="RQ's cron scheduler for retraining checks and periodic project syncs")
    p = sub.add_parser("sync", help="sync a Label Studio project into the corrections store (repairs missed webhooks)")
    p.add_argument("--project", type=int, required=True, help="Label Studio project id")
    p.add_argument("--enqueue", action="store_true", help="queue the sync for a training worker instead")
    sub.add_parser("predict", help="offline prediction with the core (see `osprey predict --help`)", add_help=False)
    sub.add_parser("download", help="fetch the official Osprey weights, CLIP and SAM into MODEL_DIR "
                                    "(see `osprey download --help`)", add_help=False)
    p = sub.add_parser("demo", help="Label Studio + the backend + a ready demo project (`make demo`)")
    p.add_argument("--ls-port", type=int, default=8080, help="Label Studio port (default 8080)")
    p.add_argument("--port", type=int, default=9090, help="backend port (default 9090)")
    p.add_argument("--images", type=int, default=12, help="demo images to import (default 12)")
    p.add_argument("--screenshots", metavar="DIR", help="take the README screenshots into DIR, then stop")
    from training.demo_model import register_cli as register_demo_cli

    register_demo_cli(sub)  # osprey demo-model, osprey demo-data
    from training.cli import register as register_train_cli

    register_train_cli(sub)  # osprey train, osprey eval
    from training.models_cli import register_models_cli

    register_models_cli(sub)  # osprey models list|show|promote|rollback
    from backend import cli_autolabel
    from backend.cvat import relabel

    cli_autolabel.register(sub)  # osprey autolabel IMAGES... --out coco.json
    relabel.register(sub)  # osprey cvat relabel --task/--job ID [--dry-run]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "predict":
        from osprey_core.cli import predict_main  # lazy: the core (torch) only for this command

        return int(predict_main(args_list[1:]) or 0)
    if args_list and args_list[0] == "download":
        from osprey_core.download import download_main

        return int(download_main(args_list[1:]) or 0)

    args = _build_parser().parse_args(args_list)
    settings = get_settings()
    overrides = {k: v for k, v in (("host", getattr(args, "host", None)), ("port", getattr(args, "port", None)))
                 if v is not None}
    if overrides:
        settings = settings.model_copy(update=overrides)
    _setup_logging(settings)

    try:
        if args.command == "serve":
            serve(settings)
        elif args.command == "worker":
            from backend.queue.worker import run_worker

            queues = [q.strip() for q in args.queues.split(",") if q.strip()]
            if queues == ["training"]:
                from backend.labelstudio.sync import periodic_jobs
                from training.schedule import run_training_worker

                run_training_worker(settings, burst=args.burst, name=args.name, schedule=args.schedule,
                                    periodic=periodic_jobs(settings), preload=("backend.labelstudio.sync",))
            else:
                run_worker(settings, burst=args.burst, name=args.name, queues=queues)
        elif args.command == "schedule":
            from backend.labelstudio.sync import periodic_jobs
            from training.schedule import run_schedule

            run_schedule(settings, periodic=periodic_jobs(settings))
        elif args.command == "sync":
            from backend.labelstudio.sync import sync_cli

            return sync_cli(settings, args.project, enqueue=args.enqueue)
        elif args.command == "autolabel":
            from backend.cli_autolabel import run_autolabel
            from backend.errors import INPUT_ERRORS

            try:
                return run_autolabel(args, settings)
            except INPUT_ERRORS as exc:
                print(f"osprey autolabel: {exc}", file=sys.stderr)
                return 2
        elif args.command == "cvat":
            from backend.cvat import pull
            from backend.cvat.relabel import run as relabel_run
            from backend.errors import INPUT_ERRORS
            from training.store import StoreError

            try:
                return pull.run(args, settings) if args.cvat_command == "pull" else relabel_run(args, settings)
            except (*INPUT_ERRORS, StoreError) as exc:
                print(f"osprey cvat {args.cvat_command}: {exc}", file=sys.stderr)
                return 2
        elif args.command == "run":
            run_all(settings)
        elif args.command in ("train", "eval"):
            from training.cli import run as run_train

            return run_train(args)
        elif args.command in ("demo-model", "demo-data"):
            return int(args.func(args) or 0)
        elif args.command == "models":
            return int(args.func(args) or 0)
        elif args.command == "demo":
            if args.screenshots:
                from backend.screenshots import take_screenshots

                return take_screenshots(settings, args.screenshots, ls_port=args.ls_port, backend_port=args.port,
                                        images=args.images)
            from backend.demo import run_demo

            return run_demo(settings, ls_port=args.ls_port, backend_port=args.port, images=args.images)
    except KeyboardInterrupt:  # Ctrl-C after a clean shutdown (uvicorn re-raises it), or during start-up
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
