"""usable_cores: affinity mask capped by a cgroup v2 CPU quota."""

import os

import pytest

from onlinemf._cores import cgroup_quota_cores, usable_cores


@pytest.mark.parametrize(
    ("text", "expected"),
    [("max 100000\n", None), ("200000 100000\n", 2), ("150000 100000", 2), ("50000 100000", 1),
     ("garbage", None), ("0 100000", None), ("abc 100000", None), ("", None)],
)
def test_cgroup_quota_parsing(tmp_path, text, expected):
    path = tmp_path / "cpu.max"
    path.write_text(text)
    assert cgroup_quota_cores(path) == expected


def test_missing_cpu_max_means_no_quota(tmp_path):
    assert cgroup_quota_cores(tmp_path / "absent") is None


def test_usable_cores_is_the_affinity_mask_without_quota(tmp_path):
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert usable_cores(tmp_path / "absent") == expected


def test_usable_cores_is_capped_by_the_quota(tmp_path):
    path = tmp_path / "cpu.max"
    path.write_text("100000 100000\n")
    assert usable_cores(path) == 1


def test_large_frees_setting_is_idempotent():
    from onlinemf._cores import return_large_frees_to_the_os

    first = return_large_frees_to_the_os()
    assert return_large_frees_to_the_os() == first
