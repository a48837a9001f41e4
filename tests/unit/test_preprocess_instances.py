"""Each preprocessing instance sizes its image threads to its share of the cores (issue 26): Triton runs
every instance as a process of its own, so instances x threads ~ the cores, not instances x cores."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from tests.unit.test_abandoned_requests import initialized, triton  # noqa: F401 (the fixture)
from vlm_serving.deploy.render import PROFILES


@pytest.mark.parametrize(("instances", "threads"), [(1, 8), (2, 4), (3, 2), (4, 2), (8, 1), (16, 1)])
def test_an_instance_has_its_share_of_the_cores_as_image_threads(triton, checkpoints, tmp_path, monkeypatch,  # noqa: F811
                                                                   instances, threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setitem(PROFILES, "cpu", replace(PROFILES["cpu"], preprocess_instances=instances))
    model = initialized("preprocess_model", "qwen2_5_vl_preprocess", checkpoints, tmp_path)
    assert model.preprocessor.pool._max_workers == threads
