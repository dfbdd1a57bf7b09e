"""End-to-end fixtures: a real Label Studio 1.23.2 server and our backend connected to it.

- Label Studio runs from its own virtualenv, `.venv-ls` (it pins Django 5.2, label-studio-sdk 2.1.2...,
  which must not mix with ours); `make test` installs it. It is started once per session as
  `label-studio start` with a temporary SQLite data dir, the environment of the protocol notes §8 (legacy
  token enabled, SSRF checks off for 127.0.0.1, local files served from a temporary document root,
  prediction validation on) and stopped with its whole process group.
- Our backend is the real `osprey serve` + `osprey worker` subprocesses on the Redis at 127.0.0.1:6379,
  built with the helpers of tests/backend/conftest.py (unique Redis prefix per stack), pointed at that
  Label Studio with its legacy token, basic auth on and a webhook secret.
Nothing is faked here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.labelstudio import devserver
from backend.labelstudio.devserver import (  # noqa: F401 - re-exported for the e2e test modules
    LS_BIN,
    LS_EMAIL,
    LS_PASSWORD,
    LS_VERSION,
    LabelStudio,
    LabelStudioError,
    label_studio_env,
)
from tests.backend.conftest import LS_TOKEN, PASSWORD, USER, Stack, make_stack

REPO = Path(__file__).resolve().parents[2]


def write_png(path: Path, width: int, height: int, seed: int) -> None:
    """A small image with two coloured blocks on noise; `seed` makes images of different tasks differ."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 50, (height, width, 3), dtype=np.uint8)
    img[height // 6: height // 2, width // 6: width // 2] = (200, 40 + 40 * seed % 160, 40)
    img[height // 2: height - 2, width // 2: width - 4] = (30, 30, 220)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def start_label_studio(workdir: Path) -> LabelStudio:
    if not LS_BIN.exists():
        pytest.fail(f"Label Studio {LS_VERSION} is not installed at {LS_BIN}: run `make test` (or `make install-ls`)",
                    pytrace=False)
    ls = devserver.start_label_studio(workdir, LS_TOKEN)
    ls.backend_auth = (USER, PASSWORD)
    return ls


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudio]:
    ls = start_label_studio(tmp_path_factory.mktemp("label-studio"))
    try:
        yield ls
    finally:
        ls.stop()


def start_stack(workdir: Path, ls: LabelStudio, worker_delay_s: float = 0.0, local_files: bool = True,
                **env: str) -> Stack:
    """Our server + one worker, with Label Studio's URL and legacy token, basic auth and a webhook secret.

    `local_files`: read `/data/local-files/?d=` from Label Studio's document root on disk (the shared
    volume of the README); without it the backend downloads them from Label Studio with its token.
    """
    if local_files:
        env["LOCAL_FILES_DOCUMENT_ROOT"] = str(ls.files_root)
    stack = make_stack(workdir, ls_url=ls.url, **env)
    if not local_files:
        stack.env.pop("LOCAL_FILES_DOCUMENT_ROOT")
    try:
        stack.start_worker(delay_s=worker_delay_s)
        stack.start_server()
    except BaseException:
        print(stack.tail())
        stack.close()
        raise
    return stack
