"""Elastic training (Horovod elastic, Gloo controller) on localhost with a host-discovery script: the
demo recipe on 3 ranks, one killed mid-run; the other two go on without a restart and reach the target."""
import pytest

from benchmarks import chaos

pytestmark = pytest.mark.multirank


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from hvdet.data.synthetic import make_synthetic_coco

    return make_synthetic_coco(tmp_path_factory.mktemp("synthetic"))  # the demo's own size: 512 + 128 images


def test_a_killed_rank_costs_only_the_iterations_since_the_commit(demo_data, tmp_path):
    r = chaos.elastic_kill(demo_data, tmp_path, kill_at=12, commit_interval=5, demo=True)
    assert r["launcher_exit_code"] == 0, r["log_tail"]
    assert r["killed_at_iteration"] is not None and r["world_sizes"] == [3, 2], r
    assert 0 <= r["iterations_lost"] <= 5, r  # at most the iterations since the last commit
    s = r["summary"]
    assert s["reached"] and s["stop"] == "target" and s["world_size"] == 2, s
    assert s["global_batch_size"] == 16  # 8 images on each of the 2 ranks left
    assert r["duplicate_records"] == 0 and r["leaked_segments"] == 0, r
