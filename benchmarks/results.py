"""Result files: writing the runner's JSON, and reading either form of results into the runner's schema.

Two files hold the same measurements:

- ``python -m benchmarks.run`` writes ``<device>-<date>.json`` (schema in ``benchmarks/README.md``);
- ``pytest benchmarks/ --benchmark-json=F`` (or ``--benchmark-autosave``) writes pytest-benchmark's file: one entry
  per case and provider whose ``extra_info`` holds the case, shape, timing, peak memory, work and ratios to ours,
  plus a top-level ``remax_kernels`` section with the environment, the ceilings, the providers skipped (and why),
  the failures and the targets.

:func:`load` reads either and returns the runner's schema, so plots and comparisons have one input format.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks import harness as hz

SCHEMA_VERSION = 1
PYTEST_SECTION = "remax_kernels"  # the top-level key our conftest adds to pytest-benchmark's JSON


def json_safe(value):
    """Non-finite floats become strings ("nan", "inf") so the file stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_results(results: dict, out_dir: Path) -> Path:
    """Write ``<device>-<date>.json`` into ``out_dir`` (``-2``, ``-3``... appended rather than overwriting)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{hz.device_slug(results['environment'])}-{results['environment']['date'][:10]}"
    path = out_dir / f"{stem}.json"
    k = 2
    while path.exists():
        path = out_dir / f"{stem}-{k}.json"
        k += 1
    path.write_text(json.dumps(json_safe(results), indent=1, allow_nan=False) + "\n")
    return path


def load(path: str | Path) -> dict:
    """A result file of either form (runner JSON or pytest-benchmark JSON), in the runner's schema."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and "families" in data and "schema_version" in data:
        return data
    if isinstance(data, dict) and "benchmarks" in data and "machine_info" in data:
        return from_pytest_benchmark(data)
    raise ValueError(f"path: {path} is neither a benchmarks.run result nor a pytest-benchmark JSON file")


def from_pytest_benchmark(data: dict) -> dict:
    """pytest-benchmark's JSON (written with our ``benchmarks/conftest.py``) in the runner's schema.

    Case records are rebuilt from each benchmark's ``extra_info`` (one per case and provider) and from the
    ``remax_kernels`` section's skipped and failed providers, in the order the tests ran (the registry's order within
    a family); ratios and work rates are recomputed with the runner's code. The targets are the section's (computed
    when the file was written) or, without them, computed here. Entries of other test suites are ignored.
    """
    section = data.get(PYTEST_SECTION)
    if section is None:
        raise ValueError(f"data: no {PYTEST_SECTION!r} section: not written by pytest benchmarks/ of remax-kernels")
    ceilings = section["ceilings"]
    size = "smoke" if section["environment"]["smoke"] else "full"
    # (family, case) -> {"meta": the case's description, "entries": provider -> entry, "infos": provider -> extra_info}
    found: dict[tuple[str, str], dict] = {}

    def add(item: dict, provider: str, entry: dict, info: dict | None = None) -> None:
        case = found.setdefault((item["family"], item["case"]), {"meta": item, "entries": {}, "infos": {}})
        case["entries"][provider] = entry
        if info is not None:
            case["infos"][provider] = info

    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "family" in info:
            add(info, info["provider"], {**info["timing"], "memory": info["memory"]}, info)
    for item in section.get("skipped", []):
        add(item, item["provider"], {"skipped": item["reason"]})
    for item in section.get("failed", []):
        add(item, item["provider"], {"error": item["error"]})

    families: dict[str, dict] = {}
    for (family, _), case in found.items():
        families.setdefault(family, {"cases": []})["cases"].append(_case_record(case, ceilings))
    for entry in families.values():
        cases = entry["cases"]
        failed = [c["name"] for c in cases if "error" in c["ours"] and c["ours"]["error"] != _NOT_MEASURED]
        if failed:
            entry.update(status="error", error=f"our op failed in: {failed}")
        elif any("ms" in e for c in cases for e in (c["ours"], *c["baselines"].values())):
            entry["status"] = "ok"  # possibly with ours deselected (`-k eager`): its entry says so
        else:
            reasons = [c["ours"]["skipped"] for c in cases if "skipped" in c["ours"]]
            entry.update(status="skipped", reason=reasons[0] if reasons else _NOT_MEASURED, cases=[])
    targets = section.get("targets")
    if targets is None:
        from benchmarks import registry  # the family modules (torch, the ops) only when targets must be computed

        targets = [t for name, entry in families.items() if entry["status"] != "skipped"
                   for t in registry.targets(name, entry["cases"], size)]
    return {"schema_version": SCHEMA_VERSION, "environment": section["environment"], "ceilings": ceilings,
            "families": families, "targets": targets, "source": "pytest-benchmark"}


_NOT_MEASURED = "not measured in this run (deselected)"


def _case_record(case: dict, ceilings: dict) -> dict:
    """One case record of the runner's schema from its providers' entries and ``extra_info``s."""
    infos, entries = case["infos"], case["entries"]
    meta = infos.get("ours") or next(iter(infos.values()), case["meta"])
    order = list(meta["providers"]) + [p for p in entries if p not in meta["providers"]]
    record = {"name": meta["case"], "op": meta["op"], "mode": meta["mode"], "shape": meta["shape"],
              "dtype": meta.get("dtype"), "ours": entries.get("ours", {"error": _NOT_MEASURED}),
              "baselines": {p: entries[p] for p in order if p != "ours" and p in entries}}
    work = meta.get("work", {})
    hz.compare(record, ceilings, bytes_moved=work.get("bytes"), flops=work.get("flops"))
    record["inputs_grads_bytes"] = meta.get("inputs_grads_bytes")
    record["extra"] = dict(meta.get("extra", {}))
    for label in order:
        for key, value in infos.get(label, {}).get("provider_extra", {}).items():
            record["extra"].setdefault(key, {})[label] = value
    return record
