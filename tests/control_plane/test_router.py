"""The least-loaded replica policy: pure decisions from loads."""

from control_plane.router import LeastLoadedPolicy, ReplicaLoad


def test_fewest_requests_first():
    loads = [ReplicaLoad("a", ongoing=3), ReplicaLoad("b", ongoing=1), ReplicaLoad("c", ongoing=2)]
    assert LeastLoadedPolicy().rank(loads) == ["b", "c", "a"]


def test_replica_report_counts_when_fresher_than_the_router():
    # the router sent nothing to "a" yet, but "a" reports 5 requests from other routers
    loads = [ReplicaLoad("a", ongoing=0, running=4, waiting=1), ReplicaLoad("b", ongoing=2)]
    assert LeastLoadedPolicy().rank(loads) == ["b", "a"]


def test_ties_go_to_more_free_kv_then_replica_id():
    loads = [
        ReplicaLoad("z", ongoing=1, kv_free_fraction=0.5),
        ReplicaLoad("y", ongoing=1, kv_free_fraction=0.9),
        ReplicaLoad("x", ongoing=1, kv_free_fraction=0.5),
    ]
    assert LeastLoadedPolicy().rank(loads) == ["y", "x", "z"]
