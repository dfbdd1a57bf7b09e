"""The cvat-sdk detection function, run as `cvat-cli task auto-annotate --function-module` runs it: the real
cvat-cli entry point (and, in process, cvat-sdk's own `annotate_task` driver, which validates the spec
against the task's labels and every returned shape and attribute) over HTTP against the fake CVAT."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.cvat.conftest import COLORS, LABELS, cvat_labels, frame
from tests.cvat.fake_cvat import TOKEN, FakeCvat

REPO = Path(__file__).resolve().parents[2]


def load_function(**params):
    """As cvat-cli does: its FunctionLoader imports the module and calls `create(**params)`."""
    from cvat_cli._internal.common import FunctionLoader

    return FunctionLoader("backend.cvat.function", None, params).load()


@pytest.fixture(scope="module")
def function():
    return load_function(labels="circle,square,triangle", attributes="color=red|green|blue", max_new_tokens=3)


def client(fake: FakeCvat):
    from cvat_sdk import make_client

    return make_client(fake.url, access_token=TOKEN)


def check_shapes(fake: FakeCvat, kind: str) -> None:
    from cvat_sdk.masks import decode_mask

    from osprey_core.proposals import ClassicalProposer, mask_iou

    shapes = fake.annotations["shapes"]
    assert len(shapes) == 3 * len(fake.frames)
    label_ids = {lab["id"]: lab for lab in fake.labels}
    for s in shapes:
        assert s["type"] == kind and s["source"] == "auto" and s["label_id"] in label_ids
        attrs = {a["spec_id"]: a["value"] for a in s["attributes"]}
        declared = {a["id"]: a for a in label_ids[s["label_id"]]["attributes"]}
        assert set(attrs) == set(declared), "color and description, with the task's attribute ids"
        for spec_id, value in attrs.items():
            if declared[spec_id]["input_type"] == "select":
                assert value in COLORS
            else:
                assert isinstance(value, str)
    for index, img in enumerate(fake.frames):
        truth = [p.region.mask for p in ClassicalProposer().propose(img)]
        mine = [s for s in shapes if s["frame"] == index]
        for s in mine:
            if kind == "mask":
                got = decode_mask([int(v) for v in s["points"]], image_width=96, image_height=96)
                assert max(mask_iou(got, t) for t in truth) == 1.0
            else:
                xs, ys = s["points"][0::2], s["points"][1::2]
                assert len(xs) >= 3 and all(0 <= v <= 96 for v in xs + ys)


def test_cvat_cli_auto_annotate_with_the_function_module(tmp_path):
    with FakeCvat([frame(0), frame(1)], cvat_labels()) as fake:
        env = {**os.environ, "CVAT_ACCESS_TOKEN": TOKEN, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
               "XDG_CACHE_HOME": str(tmp_path / "cache"), "HOME": str(tmp_path)}
        run = subprocess.run(
            [sys.executable, "-m", "cvat_cli", "--server-host", fake.url, "task", "auto-annotate", "1",
             "--function-module", "backend.cvat.function", "-p", "labels=str:circle,square,triangle",
             "-p", "attributes=str:color=red|green|blue", "-p", "max_new_tokens=int:3"],
            env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        assert ("PATCH", "/api/tasks/1/annotations/?action=create") in fake.requests
        check_shapes(fake, "mask")


def test_annotate_task_validates_spec_and_results_and_polygons(function):
    import cvat_sdk.auto_annotation as cvataa

    assert [lab.name for lab in function.spec.labels] == LABELS
    with FakeCvat([frame(2)], cvat_labels()) as fake, client(fake) as c:
        cvataa.annotate_task(c, 1, function, conv_mask_to_poly=True)
        check_shapes(fake, "polygon")


def test_conf_threshold_filters_by_the_category_score(function):
    import cvat_sdk.auto_annotation as cvataa

    with FakeCvat([frame(3)], cvat_labels()) as fake, client(fake) as c:
        cvataa.annotate_task(c, 1, function, conf_threshold=1.0)
        assert fake.annotations["shapes"] == []
        cvataa.annotate_task(c, 1, function, conf_threshold=0.0)
        assert len(fake.annotations["shapes"]) == 3


def test_cvat_sdk_refuses_a_spec_that_does_not_match_the_task(function):
    import cvat_sdk.auto_annotation as cvataa

    with FakeCvat([frame(4)], cvat_labels(colors=["red", "green"])) as fake, client(fake) as c:
        with pytest.raises(cvataa.BadFunctionError, match="color"):
            cvataa.annotate_task(c, 1, function)
        assert not any(m == "PATCH" for m, _ in fake.requests)


def test_function_parameters_are_checked():
    from backend.cvat.function import OspreyDetectionFunction, parse_attributes
    from backend.service.autolabel import AutolabelError

    with pytest.raises(AutolabelError, match="two values"):
        parse_attributes("color=red")
    with pytest.raises(AutolabelError, match="at least one label"):
        OspreyDetectionFunction(None, None, [" "])
    with pytest.raises(AutolabelError, match="reserved"):
        OspreyDetectionFunction(None, None, ["a"], parse_attributes("description=x|y"))
    assert np.array(parse_attributes("a=x|y; b=1|2|3")[1].choices).tolist() == ["1", "2", "3"]
