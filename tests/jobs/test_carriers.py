"""How far each queue has been delivered: the marks the reaper re-publishes by."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

from tasklab.jobs.carriers import AmqpCarriers, Marks, job_of, redis_list
from tasklab.jobs.publisher import BUNDLE_TASK

JOB = "0123456789abcdef0123456789abcdef"


def message(task: str, args: list[object]) -> bytes:
    body = base64.b64encode(json.dumps([args, {}, {}]).encode()).decode()
    return json.dumps(
        {"body": body, "headers": {"task": task}, "properties": {"body_encoding": "base64"}}
    ).encode()


def test_a_mark_counts_only_once_it_is_old_enough_and_the_newest_such_wins() -> None:
    marks = Marks()
    marks.add(("default", 5), 10.0, 7.0)
    marks.add(("default", 5), 20.0, 15.0)
    marks.add(("default", 5), 30.0, 28.0)

    assert marks.settled(older_than=5.0) == {}
    assert marks.settled(older_than=10.0) == {("default", 5): 7.0}
    assert marks.settled(older_than=25.0) == {("default", 5): 15.0}
    assert marks.settled(older_than=25.0) == {("default", 5): 15.0}  # kept, not consumed


def test_the_first_job_of_a_message_or_a_bundle_is_read_from_its_body() -> None:
    assert job_of(message("pb.noop", [JOB])) == JOB
    assert job_of(message(BUNDLE_TASK, ["pb.noop", [JOB, "f" * 32], "default", 5])) == JOB
    assert job_of(message("celery.plain", [1, 2])) is None  # not a tasklab job
    assert job_of(b"not json") is None


def test_kombu_lists_mirror_tasklab_priorities() -> None:
    assert redis_list("default", 9) == "default"  # most urgent: kombu priority 0
    assert redis_list("default", 5) == "default:4"
    assert redis_list("low", 0) == "low:9"


@dataclass
class Depth:
    total: int


def test_on_rabbitmq_only_a_queue_with_no_ready_message_is_marked() -> None:
    carriers = AmqpCarriers(
        lambda: {"default": Depth(0), "low": Depth(3)}, queues=["default", "low"]
    )
    carriers.observe(100.0)

    settled = carriers.marks.settled(older_than=100.0)
    assert settled[("default", 5)] == 100.0
    assert ("low", 5) not in settled


def test_on_rabbitmq_an_unreachable_broker_marks_nothing() -> None:
    def down() -> dict[str, Depth]:
        raise ConnectionError("refused")

    carriers = AmqpCarriers(down)
    carriers.observe(100.0)
    assert carriers.marks.settled(older_than=1e9) == {}
