"""agent.celery without a worker or a server: ids, queues, configuration, counting.

The end-to-end behaviour (real workers, redis-server, NATS) is
tests/integration/test_celery.py.
"""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
from celery import Celery
from celery.concurrency.prefork import TaskPool as PreforkPool
from celery.concurrency.solo import TaskPool as SoloPool

from agent.celery import (
    FAILED,
    STARTED,
    SUCCEEDED,
    _max_tasks,
    _Member,
    register_fleet,
    worker_id_for,
    worker_queue,
)
from registry import protocol


def test_worker_id_comes_from_the_nodename() -> None:
    assert worker_id_for("celery@gpu-1") == "celery-gpu-1"
    assert worker_queue("celery-gpu-1") == "worker.celery-gpu-1"
    dotted = worker_id_for("w1@box.example.com")
    assert protocol.validate_worker_id(dotted) == dotted
    assert dotted != worker_id_for("w1@box-example-com")  # a hash keeps them apart
    assert dotted == worker_id_for("w1@box.example.com")  # stable across restarts
    assert worker_id_for("plainhost") == "celery-plainhost"


def _app(conf: object = None, **options: object) -> Celery:
    app = Celery("unit")
    if conf is not None:
        app.conf.worker_registry = conf
    register_fleet(app, **options)
    return app


def test_options_beat_the_app_config_which_beats_the_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NATS_URL", "nats://from-env:4222")
    app = _app({"capability": "gpu", "content_types": "video", "port": 9}, port=10)
    settings = app._worker_registry_fleet.settings("celery@box")
    assert settings.nats_url == "nats://from-env:4222"
    assert settings.name == "celery@box"
    assert settings.own_worker_id == "celery-box"
    assert (settings.capability, settings.content_types, settings.port) == ("gpu", ("video",), 10)
    explicit = _app({"nats_url": "nats://conf:4222", "worker_id": "mine"})
    settings = explicit._worker_registry_fleet.settings("celery@box")
    assert (settings.nats_url, settings.own_worker_id) == ("nats://conf:4222", "mine")


def test_misuse_in_code_raises_at_once() -> None:
    with pytest.raises(TypeError, match="capabilty"):
        register_fleet(Celery("typo"), capabilty="gpu")
    app = _app()
    with pytest.raises(RuntimeError, match="already"):
        register_fleet(app)


def test_max_tasks_is_the_concurrency_or_one_for_solo() -> None:
    def worker(pool: type, concurrency: int, most: int | None = None) -> SimpleNamespace:
        return SimpleNamespace(pool_cls=pool, concurrency=concurrency, max_concurrency=most)

    assert _max_tasks(worker(PreforkPool, 4)) == 4
    assert _max_tasks(worker(PreforkPool, 2, most=8)) == 8  # --autoscale=8,2
    assert _max_tasks(worker(SoloPool, 4)) == 1
    assert _max_tasks(worker(PreforkPool, 10_000)) == protocol.MAX_SLOTS


def test_counts_take_each_task_once() -> None:
    """A task's end may be told twice (task_failure, then task_postrun) or for a task
    never seen start (revoked before it ran): each task counts once."""
    app = _app(nats_url="nats://127.0.0.1:1")
    member = _Member(app, "celery@box", app._worker_registry_fleet.settings("celery@box"))
    member.set_up(SimpleNamespace(pool_cls=SoloPool, concurrency=1, max_concurrency=None))
    assert member.agent is not None
    for kind, task_id in [(STARTED, "a"), (STARTED, "a"), (SUCCEEDED, "a"), (STARTED, "b")]:
        member.tell(kind, task_id)
    assert (member.agent.tasks.active, member.agent.tasks.completed) == (1, 1)
    for kind, task_id in [(FAILED, "b"), (SUCCEEDED, "b"), (FAILED, "never-started")]:
        member.tell(kind, task_id)
    counts = member.agent.tasks
    assert (counts.active, counts.completed, counts.failed) == (0, 1, 1)
    assert "worker.celery-box" in member.queues


def test_importing_agent_or_registry_does_not_import_celery() -> None:
    code = (
        "import sys, agent, agent.cli, registry, registry.router, registry.cli\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('celery', 'kombu')], 'celery'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
