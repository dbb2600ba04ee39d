"""The benchmark families, listed once for both runners (``python -m benchmarks.run`` and pytest-benchmark).

Each family module (``bench_<family>.py``) defines ``FAMILY`` (its name), ``specs(size)`` (its cases as
:class:`~benchmarks.harness.CaseSpec`, for ``size`` in :data:`~benchmarks.harness.SIZES`) and
``targets(cases, size)`` (the issue's targets, computed from the measured case records). A family's providers (ours,
baselines, peers, our own options) are the entries of its ``PROVIDERS`` table(s): adding a backend or a peer is one
entry there, and both runners, the result files and the plots pick it up.
"""

from __future__ import annotations

from benchmarks import bench_generate, bench_logprobs, bench_policy_loss, bench_sampling, bench_trainer
from benchmarks import harness as hz

FAMILIES = {
    module.FAMILY: module
    for module in (bench_logprobs, bench_policy_loss, bench_sampling, bench_generate, bench_trainer)
}


def specs(family: str, size: str) -> list[hz.CaseSpec]:
    """The cases of one family at one size (``"full"``: the GPU shapes, ``"smoke"``: tiny CPU shapes)."""
    if family not in FAMILIES:
        raise ValueError(f"family: unknown {family!r}; choose from {list(FAMILIES)}")
    if size not in hz.SIZES:
        raise ValueError(f"size: must be one of {hz.SIZES}, got {size!r}")
    return FAMILIES[family].specs(size)


def targets(family: str, cases: list[dict], size: str) -> list[dict]:
    """The family's targets evaluated on its case records, each tagged with the family's name."""
    out = FAMILIES[family].targets(cases, size)
    for t in out:
        t["family"] = family
    return out
