"""Merge-method records are checked when they are defined: a stage that cannot run is refused, never skipped."""

from __future__ import annotations

import pytest

from diffusion_merge.merging.methods import METHODS, Basis, Combine, MergeMethod, Sparsify
from diffusion_merge.merging.sparsify import RANK_RULES


def make(**fields):
    record = {
        "name": "custom",
        "summary": "test method",
        "reference": "none",
        "sparsify": Sparsify.MAGNITUDE,
        "combine": Combine.SUM,
        "defaults": {"k": 0.1},
        "rank_rule": RANK_RULES["ties"],
        "keep": lambda params: params["k"],
    }
    return MergeMethod(**{**record, **fields})


def test_a_complete_record_is_accepted():
    assert make().sparsify is Sparsify.MAGNITUDE


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"sparsify": "magnitud"}, "sparsify must be a Sparsify"),
        ({"combine": "stich"}, "combine must be a Combine"),
        ({"basis": "svd"}, "basis must be a Basis"),
        ({"rank_rule": None}, "needs both rank_rule and keep"),
        ({"sparsify": Sparsify.RANDOM}, "needs both rank_rule and keep"),
        ({"basis": Basis.SVD}, "basis_keep goes with the SVD basis"),
        ({"sparsify": Sparsify.NONE, "rank_rule": None, "keep": None, "combine": Combine.STITCH}, "stitching"),
    ],
)
def test_a_record_that_cannot_run_is_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        make(**fields)


def test_every_method_names_its_paper():
    for method in METHODS.values():
        assert "arXiv" in method.reference, method.name
