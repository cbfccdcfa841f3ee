from __future__ import annotations

from pathlib import Path

import pytest

from tasklab.lab.errors import LabError
from tasklab.lab.harness import LabStack, WorkerConfig, load_app, worker_config
from tasklab.settings import Settings


def test_a_second_lab_run_on_the_same_home_is_refused_while_the_first_runs(
    lab_settings: Settings,
) -> None:
    with LabStack(lab_settings, workers="none") as first:
        assert first.broker_is_redis and first.redis() is not None
        with pytest.raises(LabError, match="another lab run is using"):
            LabStack(lab_settings, workers="none").start()
    with LabStack(lab_settings, workers="none"):
        pass  # free again once the first one stopped


def test_embedded_runs_use_a_scratch_database_of_their_own(lab_settings: Settings) -> None:
    with LabStack(lab_settings, workers="none") as stack:
        assert stack.settings.sqlite_path == lab_settings.home_dir / "lab" / "tasklab.db"
        assert stack.settings.sqlite_path.is_file()
        assert stack.priority(9) == 0  # Redis pops 0 first
        assert stack.owner("fast").startswith(f"lab:{stack.run_id}:")
    assert not (lab_settings.home_dir / "tasklab.db").exists()


def test_a_worker_config_comes_from_the_settings() -> None:
    settings = Settings(worker_pool="threads", worker_concurrency=8, worker_prefetch_multiplier=2)
    config = WorkerConfig.from_settings(settings)
    assert config == WorkerConfig("threads", 8, 2)
    assert config.label() == "threads x8, prefetch 2"
    assert worker_config(settings, concurrency=3, nodes=2) == WorkerConfig("threads", 3, 2, 2)


@pytest.mark.parametrize(
    ("spec", "message"),
    [("no_such_module_xyz:app", "cannot import"), ("tasklab.settings:Settings", "no Celery app")],
)
def test_an_app_spec_that_is_not_a_celery_app_is_refused(
    spec: str, message: str, tmp_path: Path
) -> None:
    with pytest.raises(LabError, match=message):
        load_app(spec)
