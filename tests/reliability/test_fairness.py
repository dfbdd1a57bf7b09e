"""Fair lanes end to end: the real server, one real worker, the real Redis, write-back to the fake Label Studio.

- One worker allowed to take batch work (OSPREY_INTERACTIVE_RESERVED_WORKERS=0) and a running batch of slow
  jobs: a click sent while most of the batch is queued is answered after at most the batch job that was
  running, not after the batch.
- Per-project fairness: project A's large batch, then project B's small one; B's tasks all finish while
  most of A's still wait.

Orderings come from the jobs' own start and end stamps in RQ (one worker: one clock, one job at a time) and
from counts of started jobs, never from how long anything took.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from rq.job import Job
from rq.serializers import JSONSerializer

from tests.backend.conftest import FakeLabelStudio, Stack, make_stack, running, wait_for
from tests.reliability.conftest import batch_body

DELAY_S = 1.0  # every job sleeps this long first (OSPREY_TEST_JOB_DELAY_S): a batch job is still running when we click


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory: pytest.TempPathFactory, fake_ls: FakeLabelStudio) -> Iterator[Stack]:
    with running(make_stack(tmp_path_factory.mktemp("fair"), ls_url=fake_ls.url, OSPREY_INTERACTIVE_RESERVED_WORKERS="0",
                            OSPREY_BATCH_BUDGET_S="1", OSPREY_INTERACTIVE_TIMEOUT_S="60"), DELAY_S) as s:
        yield s


def jobs_of(s: Stack, kind: str) -> list[Job]:
    """Every prediction job of `kind` this stack ran or queued (not the write-back deliveries)."""
    r = s.redis()
    ids = [k.decode()[len("rq:job:"):] for k in r.scan_iter(f"rq:job:{s.prefix}-{kind}-*")]
    return [j for j in Job.fetch_many([i for i in ids if not i.endswith("-wb")], connection=r,
                                      serializer=JSONSerializer) if j is not None]


def started_batch_jobs(s: Stack) -> int:
    """Batch jobs a worker has started so far (the worker counts each run as it starts it)."""
    return sum(1 for job_id in s.job_runs() if f"{s.prefix}-batch-" in job_id)


def post_batch(s: Stack, payloads, configs, tasks: list[int], project: str) -> list[int]:
    """Send a Retrieve-Predictions batch; the tasks left for write-back (not answered inside the budget)."""
    response = s.post("/predict", batch_body(payloads, configs, tasks, project=project))
    assert response.status_code == 200, response.text
    entries = response.json()["results"]
    assert len(entries) == len(tasks)
    return [t for t, e in zip(tasks, entries, strict=True) if "result" not in e]


def test_one_worker_answers_a_click_between_two_batch_jobs(one_worker, payloads, configs, fake_ls):
    s = one_worker
    tasks = list(range(9001, 9017))
    later = post_batch(s, payloads, configs, tasks, project="31")
    wait_for(lambda: started_batch_jobs(s) >= 2, 60, "the batch to be running")
    started_before = started_batch_jobs(s)  # the running one included

    click = payloads.predict([payloads.task(9100)], configs["keypoint_sam"],
                             {"result": [payloads.keypoint(region_id="between")]})
    answered = s.post("/predict", click)
    started_at_answer = started_batch_jobs(s)
    assert answered.status_code == 200, answered.text
    assert {i["id"] for i in answered.json()["results"][0]["result"]} == {"between"}
    # Answered after the running batch job, and at most one more (started after the click's job ended,
    # before its answer reached us): most of the batch was still queued.
    assert started_at_answer <= started_before + 2, (started_before, started_at_answer)
    assert started_at_answer <= len(tasks) // 2, (started_at_answer, len(tasks))

    wait_for(lambda: all(len(fake_ls.for_task(t)) == 1 for t in later), 240, "the rest of the batch written back")
    [interactive] = jobs_of(s, "interactive")
    batch = jobs_of(s, "batch")
    assert len(batch) == len(tasks)
    before_click = [j for j in batch if j.started_at < interactive.started_at]
    # The click's job started before every batch job that had not started when it was sent (the worker
    # may have popped one more in the instant between our count and the click's enqueue).
    assert len(before_click) <= started_before + 1, (len(before_click), started_before)
    assert max(j.ended_at for j in batch) > interactive.ended_at  # the batch was still running


def test_a_small_batch_of_one_project_finishes_while_another_projects_large_batch_waits(one_worker, payloads,
                                                                                        configs, fake_ls):
    s = one_worker
    large, small = list(range(9201, 9221)), list(range(9301, 9304))
    started_before_large = {j.id for j in jobs_of(s, "batch")}
    later = post_batch(s, payloads, configs, large, project="41")  # project A first: 20 tasks ...
    later += post_batch(s, payloads, configs, small, project="42")  # ... then project B: 3 tasks

    wait_for(lambda: all(len(fake_ls.for_task(t)) == 1 for t in later), 300, "both batches written back")
    finished = sorted((j for j in jobs_of(s, "batch") if j.id not in started_before_large), key=lambda j: j.ended_at)
    order = [j.args[0]["task_id"] for j in finished]
    assert sorted(order) == sorted(large + small)  # each task ran once, none lost
    last_small = max(order.index(t) for t in small)
    large_done_first = sum(1 for t in order[:last_small] if t in large)
    # Round-robin between the projects: B waited behind the few A jobs already fed to the batch queue, not
    # behind A's whole batch.
    assert large_done_first < len(large) // 2, order
    assert all(len(fake_ls.for_task(t)) <= 1 for t in large + small)  # nothing written twice
