"""deploy/docker-compose.yml, its env files and deploy/redis/redis.conf.

The Docker engine is not available on the machines that run these tests (CI included), so the stack is
not started. Instead: the compose file is validated against the Compose Specification JSON schema
(`check-jsonschema --builtin-schema vendor.compose-spec`), its structure is checked (one GPU per
worker, secrets only in env files, the Label Studio settings our notes require), and the Redis part runs
for real: the compose service's own start command, with deploy/redis/redis.conf, on this machine's
redis-server, checked for the password, AOF and noeviction.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import redis
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
SECRET_NAME = re.compile(r"PASS|SECRET|TOKEN|KEY", re.I)


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def env_file(name: str) -> dict[str, str]:
    """KEY=value lines of deploy/env/<name>.env.example (comments and commented-out lines skipped)."""
    out = {}
    for line in (DEPLOY / "env" / f"{name}.env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def check_jsonschema(path: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("check-jsonschema") or str(Path(sys.executable).with_name("check-jsonschema"))
    assert Path(exe).exists(), "check-jsonschema missing: it comes with the test extra (pip install -e '.[test]')"
    return subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_compose_file_matches_the_compose_specification():
    r = check_jsonschema(COMPOSE)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_schema_check_rejects_a_broken_compose_file(tmp_path):
    # Not vacuous: a misspelt key where the spec allows none, and a wrong type, both fail.
    data = compose()
    data["services"]["worker-gpu0"]["deploy"]["resources"]["reservations"]["gpus"] = 1
    bad = tmp_path / "compose.yml"
    bad.write_text(yaml.safe_dump(data))
    assert check_jsonschema(bad).returncode != 0
    data = compose()
    data["services"]["web"]["ports"] = 9090
    bad.write_text(yaml.safe_dump(data))
    assert check_jsonschema(bad).returncode != 0


def test_services_and_one_gpu_per_worker():
    services = compose()["services"]
    assert {"label-studio", "redis", "postgres", "web", "trainer", "schedule"} <= set(services)
    assert services["label-studio"]["image"] == "heartexlabs/label-studio:1.23.2"
    for name, svc in services.items():
        image = svc["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: image not pinned"

    workers = {n: s for n, s in services.items() if n.startswith("worker-gpu")}
    assert len(workers) >= 2
    seen = set()
    for name, svc in workers.items():
        assert svc["command"] == ["worker"]
        assert svc["environment"]["OSPREY_DEVICE"] == "cuda"
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        assert len(device["device_ids"]) == 1 and "count" not in device, f"{name} must hold exactly one GPU"
        seen.add(device["device_ids"][0])
    assert len(seen) == len(workers), "two workers on one GPU"

    assert services["trainer"]["command"] == ["worker", "--queues", "training"]
    assert services["trainer"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert services["schedule"]["command"] == ["schedule"]
    assert services["web"]["command"] == ["serve"]
    assert "deploy" not in services["web"] and "deploy" not in services["schedule"]  # no GPU for them

    # Every Osprey service shares the model directory and the HF cache with the others.
    for name in ("web", "trainer", "schedule", *workers):
        vols = services[name]["volumes"]
        assert "models:/data" in vols and "hf-cache:/cache/huggingface" in vols
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert [e["path"] for e in services[name]["env_file"]] == ["./env/osprey.env"]
    assert services["web"]["ports"] == ["127.0.0.1:9090:9090"]  # loopback only on the host


def test_secrets_live_in_env_files_only():
    services = compose()["services"]
    for name, svc in services.items():
        for key in svc.get("environment") or {}:
            assert not SECRET_NAME.search(key), f"{name}: secret {key} set in the YAML"
        for entry in svc.get("env_file", []):
            path = (COMPOSE.parent / entry["path"]).resolve()
            assert entry["required"] is True
            assert Path(f"{path}.example").is_file(), f"{entry['path']} has no .example template"
            ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT).returncode == 0
            assert ignored, f"{entry['path']} (the filled-in copy) is not git-ignored"
    text = COMPOSE.read_text()
    for name in ("osprey", "redis", "postgres", "labelstudio"):
        for key, value in env_file(name).items():
            if SECRET_NAME.search(key) and value not in ("", "true", "false"):  # not the on/off switches
                assert value not in text, f"the value of {key} appears in the compose file"
                assert "change-me" in value, f"{name}.env.example: {key} must be a placeholder"


def test_env_files_agree_with_each_other_and_the_settings():
    osprey, pg, rd, ls = env_file("osprey"), env_file("postgres"), env_file("redis"), env_file("labelstudio")
    redis_url = urlparse(osprey["REDIS_URL"])
    assert redis_url.hostname == "redis" and redis_url.password == rd["REDIS_PASSWORD"]
    db = urlparse(osprey["DATABASE_URL"])
    assert (db.hostname, db.username, db.password, db.path.lstrip("/")) == (
        "postgres", pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"])
    assert urlparse(osprey["LABEL_STUDIO_URL"]).hostname == "label-studio"
    assert osprey["LABEL_STUDIO_API_KEY"] == ls["LABEL_STUDIO_USER_TOKEN"]

    # Every variable we set is one the backend reads (a typo would be silently ignored otherwise).
    from backend.settings import Settings

    known = {name.upper() for name in Settings.model_fields} | {"DATABASE_URL"}
    assert set(osprey) <= known, f"unknown variables: {sorted(set(osprey) - known)}"

    # Label Studio 1.23.2 in Docker: a fixed SECRET_KEY, and the two SSRF switches for a private backend.
    assert ls["SECRET_KEY"] and ls["ML_BLOCK_LOCAL_IP"] == "false" and ls["SSRF_PROTECTION_ENABLED"] == "false"


# --- Redis, for real ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def compose_redis(tmp_path):
    """deploy/docker-compose.yml's redis command, with the conf at its real path replaced by ours and the
    container-only parts (port, bind, data dir) overridden for a throwaway server on 127.0.0.1."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is needed (the test machines run Redis)")
    svc = compose()["services"]["redis"]
    mounts = dict(v.rsplit(":", 2)[:2][::-1] for v in svc["volumes"] if v.startswith("./"))
    conf = (COMPOSE.parent / mounts["/usr/local/etc/redis/redis.conf"]).resolve()
    assert conf == DEPLOY / "redis" / "redis.conf"
    sh, flag, script = svc["command"]
    assert (sh, flag) == ("sh", "-c")
    script = script.replace("$$", "$")  # compose's escape for a literal $
    script = script.replace("/usr/local/etc/redis/redis.conf", str(conf))
    script = script.replace("/tmp/redis-auth.conf", str(tmp_path / "auth.conf"))
    port = free_port()
    script += f" --port {port} --bind 127.0.0.1 --dir {tmp_path} --daemonize no --logfile {tmp_path / 'log'}"
    password = "test-Pass_123"
    proc = subprocess.Popen(["sh", "-c", script], env={"REDIS_PASSWORD": password, "PATH": os.environ["PATH"]},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    client = redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=5, decode_responses=True)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (tmp_path / "log").read_text() if (tmp_path / "log").exists() else ""
                proc.kill()
                pytest.fail(f"redis did not start: {proc.stdout.read().decode()} {log}")
            time.sleep(0.1)
    yield client, port, tmp_path
    proc.terminate()
    proc.wait(timeout=20)


def test_redis_conf_password_aof_noeviction(compose_redis):
    client, port, data_dir = compose_redis
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=port, socket_timeout=5).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=port, password="wrong", socket_timeout=5).ping()
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
    assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    client.set("osprey-deploy-test", "1")
    assert client.get("osprey-deploy-test") == "1"
    # AOF is on disk (Redis 7 keeps it under appenddirname).
    assert any(p.name.startswith("appendonly.aof") for p in data_dir.rglob("*"))
    # The password file written at start is private to the Redis user.
    assert (data_dir / "auth.conf").stat().st_mode & 0o077 == 0


def test_every_osprey_command_in_the_stack_is_one_the_cli_accepts():
    # The image's entry point is `osprey` = backend.cli; its parser must accept each compose command
    # exactly (argparse exits on an unknown command, option or value).
    from backend.cli import _build_parser

    commands = {tuple(svc["command"]) for name, svc in compose()["services"].items()
                if svc.get("image", "").startswith("osprey-labeling")}
    assert ("worker", "--queues", "training") in commands and ("schedule",) in commands
    parser = _build_parser()
    for command in sorted(commands):
        args = parser.parse_args(list(command))
        assert args.command == command[0]
    assert parser.parse_args(["worker", "--queues", "training"]).queues == "training"
    with pytest.raises(SystemExit):
        parser.parse_args(["worker", "--queus", "training"])  # a typo is caught, so the check has teeth
