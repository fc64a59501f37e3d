"""Every method's smoke runs give the numbers recorded before the method interface was reshaped (issue 15):
the same metrics rows (losses within 1e-5 relative, accuracies and everything else equal) and the same final prompt
states (within 1e-5). The cases and the recorder are in ``tests/digest.py``."""

from __future__ import annotations

import pytest
import torch

from conftest import ROOT
from digest import CASES, run_case
from fedprompt.federation.eval_summaries import is_summary_key

#: the recorded digests: the original one and the files of cases added later (never re-recorded together)
REFERENCES = sorted((ROOT / "tests" / "data").glob("smoke_digest*.pt"))


@pytest.fixture(scope="module")
def reference():
    merged = {}
    for path in REFERENCES:
        part = torch.load(path, weights_only=True)
        assert not set(part) & set(merged), f"{path.name} records cases recorded elsewhere: {set(part) & set(merged)}"
        merged.update(part)
    return merged


def assert_rows_equal(name, got, want):
    assert len(got) == len(want), name
    for a, b in zip(got, want):
        # every recorded key is there; the only new keys are the evaluation's metrics beyond accuracy (issue 28)
        assert set(b) - {"parallel_clients"} <= set(a), name
        assert all(is_summary_key(k) for k in set(a) - set(b) - {"parallel_clients"}), (name, set(a) - set(b))
        for key in b:
            if key == "train_loss":
                assert a[key] == pytest.approx(b[key], rel=1e-5), (name, key)
            else:
                assert a[key] == b[key], (name, key, a[key], b[key])


def assert_states_close(name, got, want):
    assert set(got) == set(want), name
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-5, msg=lambda m: f"{name} {key}: {m}")


@pytest.mark.parametrize("name", list(CASES))
def test_smoke_run_equals_the_recorded_digest(reference, tmp_path, name):
    got, want = run_case(name, tmp_path / name), reference[name]
    assert_rows_equal(name, got["rows"], want["rows"])
    assert set(got["clients"]) == set(want["clients"])
    for cid, state in want["clients"].items():
        assert_states_close(f"{name} client {cid}", got["clients"][cid], state)
    assert_states_close(f"{name} global", got["global"], want["global"])
