"""TensorBoard scalars of a training run: written, readable, and one run's curves after a resume."""

from __future__ import annotations

import math

import pytest

from wildreid.core.errors import ConfigError
from wildreid.scalars import NoScalars, open_scalars, read_scalars


def test_steps_and_epochs_are_written_and_read_back(tmp_path):
    scalars = open_scalars(tmp_path / "tb")
    for step in range(1, 6):
        scalars.step(step, 1.0 / step, {"backbone": 0.001, "neck": 0.01})
    record = {"epoch": 0, "loss": 0.25, "precision": None, "warmup": True, "nested": {"hits": 3}, "bad": math.nan}
    scalars.epoch(5, record)
    scalars.close()
    found = read_scalars(tmp_path / "tb")
    assert [s for s, _ in found["step/loss"]] == [1, 2, 3, 4, 5]
    assert found["step/loss"][3][1] == pytest.approx(0.25)
    assert found["step/lr/neck"] == [(s, pytest.approx(0.01)) for s in range(1, 6)]
    # numbers only: None, booleans and NaN are left out; nested records are flattened
    assert set(found) == {
        "step/loss",
        "step/lr/backbone",
        "step/lr/neck",
        "epoch/epoch",
        "epoch/loss",
        "epoch/nested/hits",
    }
    assert found["epoch/nested/hits"] == [(5, 3.0)]


def test_a_resumed_run_replaces_what_the_lost_session_logged(tmp_path):
    first = open_scalars(tmp_path / "tb")
    for step in range(1, 9):  # the checkpoint was at step 5; steps 6-8 were lost to a kill -9
        first.step(step, float(step), {})
    first.flush()
    resumed = open_scalars(tmp_path / "tb", resumed_step=5)
    for step in range(6, 11):
        resumed.step(step, 100.0 + step, {})
    resumed.close()
    assert read_scalars(tmp_path / "tb")["step/loss"] == [(s, float(s)) for s in range(1, 6)] + [
        (s, 100.0 + s) for s in range(6, 11)
    ]


def test_no_folder_writes_nothing_and_a_bad_folder_is_one_error(tmp_path):
    assert type(open_scalars(None)) is NoScalars
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot create the TensorBoard folder"):
        open_scalars(blocker / "tb")
