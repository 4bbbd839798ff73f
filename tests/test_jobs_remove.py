"""Removing a job that is over (the jobs panel's Remove button, DELETE /tdm/jobs/<id>): its record, checkpoints and
preview go, its LoRA files stay; an active job is refused; a removal interrupted after the rename is finished at the
next start and never brings the job back."""

from __future__ import annotations

import time

import pytest
from test_jobs import FakeRuntime, _manager

from tdm_core import jobs


def test_a_finished_job_is_forgotten_and_its_loras_stay(tmp_path):
    events = []
    manager = _manager(tmp_path, events)
    record = manager.submit("done", FakeRuntime(), 3, save_every=1, keep_last=2, preview_every=1)
    manager.wait(record.id, timeout=30)
    loras = tmp_path / "loras"
    files = sorted(p.name for p in loras.glob("*.safetensors"))
    assert files and (loras / ".tdm_jobs" / record.id / "job.json").is_file()

    removed = manager.remove("done")  # by output name, as the routes accept
    assert removed.id == record.id
    assert not (loras / ".tdm_jobs" / record.id).exists()
    assert not [p for p in (loras / ".tdm_jobs").iterdir()]
    assert sorted(p.name for p in loras.glob("*.safetensors")) == files  # the LoRAs are the user's now
    assert ("tdm.job.removed", {"id": record.id, "name": "done"}) in events
    with pytest.raises(jobs.JobError) as error:
        manager.get(record.id)
    assert error.value.status == 404
    manager.close()
    assert [r.id for r in _manager(tmp_path).list()] == []  # and a restart does not bring it back


def test_an_active_job_is_refused_until_stopped(tmp_path):
    manager = _manager(tmp_path)
    record = manager.submit("busy", FakeRuntime(delay=0.05), 1000, save_every=0)
    deadline = time.monotonic() + 10
    while manager.get(record.id).state != "running" and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(jobs.JobError) as error:
        manager.remove(record.id)
    assert error.value.status == 409 and "stop it" in str(error.value)
    manager.stop(record.id)
    manager.wait(record.id, timeout=30)
    manager.remove(record.id)  # stopped: resumable no more, by the user's choice
    assert manager.list() == []
    manager.close()


def test_an_interrupted_removal_is_finished_at_the_next_start(tmp_path):
    manager = _manager(tmp_path)
    record = manager.submit("half", FakeRuntime(), 2, save_every=1)
    manager.wait(record.id, timeout=30)
    manager.close()
    jobs_dir = tmp_path / "loras" / ".tdm_jobs"
    (jobs_dir / record.id).rename(jobs_dir / f".removed-{record.id}")  # the process died right after the rename
    restarted = _manager(tmp_path)
    assert restarted.list() == []
    assert not (jobs_dir / f".removed-{record.id}").exists()
    restarted.close()
