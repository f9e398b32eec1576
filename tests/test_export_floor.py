"""The SHA-NI kernel of benchmarks/export_floor.py: its digests, one lane and two, are hashlib's."""

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import export_floor  # noqa: E402


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    lib = export_floor.sha_ni_kernel(tmp_path_factory.mktemp("kernel"))
    if isinstance(lib, str):
        pytest.skip(lib)
    return lib


@pytest.mark.parametrize("blocks", [0, 1, 3, 1000])
def test_lanes_give_hashlibs_digests(kernel, blocks):
    rng = np.random.default_rng(blocks)
    a, b = (rng.integers(0, 256, 64 * blocks, np.uint8) for _ in range(2))
    want = [hashlib.sha256(a).hexdigest(), hashlib.sha256(b).hexdigest()]
    assert export_floor.ni_digests(kernel, [a, b])[0] == want
    assert [export_floor.ni_digests(kernel, [x])[0][0] for x in (a, b)] == want


def test_a_changed_byte_changes_only_its_lane(kernel):
    a = np.zeros(64 * 8, np.uint8)
    b = a.copy()
    b[300] = 1
    da, db = export_floor.ni_digests(kernel, [a, b])[0]
    assert da == hashlib.sha256(a).hexdigest() and db == hashlib.sha256(b).hexdigest() and da != db
