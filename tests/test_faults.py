"""Faults at cluster scale, injected into real 2-rank runs through launch/horovodrun.sh and launch/mpirun.sh:
a stalled rank, a killed rank, preemption, a data error on one rank, a full disk (benchmarks/chaos.py,
whose experiments these are; `make chaos` prints their figures)."""
import os

import pytest

from benchmarks import chaos

pytestmark = pytest.mark.multirank


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("chaos")


@pytest.fixture(scope="module")
def data(workdir):
    return chaos.make_data(workdir / "data")


@pytest.fixture(scope="module")
def reference(data, workdir):
    return chaos.reference_run(data, workdir)


@pytest.mark.parametrize("launcher", ["horovodrun", "mpirun"])
def test_a_stalled_rank_ends_the_job_naming_it(launcher, data, workdir):
    r = chaos.stall(launcher, data, workdir)
    assert r["launcher_exit_code"] == 3, r  # stalled, passed through the launch script
    assert r["names_rank_1"], r["message"]
    assert r["seconds_to_exit"] >= chaos.TIMEOUT_S  # the policy's time-out ended it, not something else
    assert r["ranks_gone_s"] is not None, "a rank outlived the job"
    assert r["leaked_segments"] == 0 and r["temp_files"] == []


@pytest.mark.parametrize("launcher", ["horovodrun", "mpirun"])
def test_preemption_checkpoints_every_rank_and_resumes_exactly(launcher, data, workdir, reference):
    r = chaos.preempt(launcher, data, workdir, reference)
    assert r["launcher_exit_code"] == 75 and r["stop"] == "preempted", r
    assert r["checkpoint_iteration"] >= 3 and r["iterations_lost"] == 0, r
    assert r["resume_exit_code"] == 0 and r["resumed_equals_uninterrupted"], r
    assert r["duplicate_records"] == 0 and r["elapsed_s_monotonic"], r
    assert r["leaked_segments"] == 0 and r["temp_files"] == []


def test_a_killed_rank_loses_only_the_iterations_since_the_checkpoint(data, workdir, reference):
    r = chaos.kill("horovodrun", data, workdir, reference)
    assert r["launcher_exit_code"] not in (0, None), r
    assert 0 <= r["iterations_lost"] < 2, r  # checkpoints every 2 iterations
    assert r["resume_exit_code"] == 0 and r["resumed_equals_uninterrupted"], r
    assert r["duplicate_records"] == 0 and r["elapsed_s_monotonic"], r
    assert r["leaked_segments"] == 0 and r["temp_files"] == []


def test_a_data_error_on_one_rank_is_one_line_naming_the_file(data, workdir):
    r = chaos.data_rank1("horovodrun", data, workdir)
    assert r["launcher_exit_code"] == 1 and r["names_the_file"], r
    assert any("rank 1: cannot decode image file" in line for line in r["message"]), r["message"]
    assert r["leaked_segments"] == 0 and r["temp_files"] == []


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_names_the_file_and_leaves_no_temp_file(data, workdir):
    r = chaos.disk_full(data, workdir)
    assert r["launcher_exit_code"] == 1 and r["names_the_file"], r
    assert any("No space left on device" in line for line in r["message"]), r["message"]
    assert r["temp_files"] == []
