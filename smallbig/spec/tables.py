"""`params/tables.yaml`: the paper's Tables 2-11 row by row, and where each of our numbers comes
from. `load_tables()` reads and validates it; every problem raises :class:`TablesError` naming
the file, the key (e.g. `tables[8].rows[16].protocol`) and the problem.

Row kinds:
  experiment: <id> + protocol      our number = results/<run>/<id>/eval-<protocol>/metrics.json
  ensemble: [<id>, ...] + protocol + name
                                   results/<run>/ensembles/<name>/metrics.json (or fused here from
                                   the members' eval-<protocol>/scores.npz)
  external: true                   another paper's number, shown as reported
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any


from smallbig.config import REPO_ROOT, ParamsError, experiment_ids

TABLES_PATH = REPO_ROOT / "params" / "tables.yaml"
PAPER_KEYS = ("top1", "top5", "params_m", "gflops", "views", "gflops_x_views", "views_text")
ROW_KEYS = {"label", "paper", "experiment", "ensemble", "external", "protocol", "name",
            "backbone", "input", "dataset", "section", "note"}
TABLE_KEYS = {"number", "title", "dataset", "rows"}
DATASETS = {"kinetics400", "sthv1", "sthv2"}
SECTIONS = {"single-clip", "multi-view"}
_PROTOCOL = re.compile(r"^[1-9][0-9]*x[1-9][0-9]*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class TablesError(ParamsError):
    """params/tables.yaml is missing or invalid; the message names the file, key and problem.
    (A ParamsError, so the `smallbig` CLI reports it as one: exit code 2, no traceback.)"""


def _num_or_none(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def validate_tables(data: Any, source: str | Path = TABLES_PATH,
                    known_ids: set[str] | None = None) -> list[dict]:
    """Check the structure of a tables document; return its list of tables."""
    src = str(source)

    def fail(key: str, problem: str):
        raise TablesError(f"{src}: {key}: {problem}")

    if not isinstance(data, dict) or "tables" not in data:
        fail("(top level)", "must be a mapping with a `tables:` list")
    tables = data["tables"]
    if not isinstance(tables, list) or not tables:
        fail("tables", "must be a non-empty list")
    known = set(experiment_ids()) if known_ids is None else set(known_ids)
    numbers, names = [], {}
    for ti, t in enumerate(tables):
        tk = f"tables[{ti}]"
        if not isinstance(t, dict):
            fail(tk, "must be a mapping")
        unknown = set(t) - TABLE_KEYS
        if unknown:
            fail(tk, f"unknown key(s) {sorted(unknown)}")
        for k in ("number", "title", "rows"):
            if k not in t:
                fail(tk, f"missing `{k}`")
        if not isinstance(t["number"], int) or isinstance(t["number"], bool):
            fail(f"{tk}.number", f"must be an integer, got {t['number']!r}")
        if t["number"] in numbers:
            fail(f"{tk}.number", f"table {t['number']} appears twice")
        if numbers and t["number"] < numbers[-1]:
            fail(f"{tk}.number", "tables must be in the paper's order")
        numbers.append(t["number"])
        if not isinstance(t["rows"], list) or not t["rows"]:
            fail(f"{tk}.rows", "must be a non-empty list")
        for ri, r in enumerate(t["rows"]):
            rk = f"{tk}.rows[{ri}]"
            if not isinstance(r, dict):
                fail(rk, "must be a mapping")
            unknown = set(r) - ROW_KEYS
            if unknown:
                fail(rk, f"unknown key(s) {sorted(unknown)}")
            if not isinstance(r.get("label"), str) or not r["label"].strip():
                fail(f"{rk}.label", "missing or empty")
            paper = r.get("paper")
            if not isinstance(paper, dict):
                fail(f"{rk}.paper", "missing (the paper's numbers, as a mapping)")
            bad = set(paper) - set(PAPER_KEYS)
            if bad:
                fail(f"{rk}.paper", f"unknown key(s) {sorted(bad)}; allowed {list(PAPER_KEYS)}")
            if "top1" not in paper:
                fail(f"{rk}.paper.top1", "missing")
            for k, v in paper.items():
                if k == "views_text":
                    if not isinstance(v, str):
                        fail(f"{rk}.paper.{k}", f"must be a string, got {v!r}")
                elif not _num_or_none(v):
                    fail(f"{rk}.paper.{k}", f"must be a number or null, got {v!r}")
            kinds = [k for k in ("experiment", "ensemble", "external") if k in r]
            if len(kinds) != 1:
                fail(rk, f"needs exactly one of experiment / ensemble / external, has {kinds or 'none'}")
            kind = kinds[0]
            if kind == "external":
                if r["external"] is not True:
                    fail(f"{rk}.external", "must be `true`")
                for k in ("protocol", "name"):
                    if k in r:
                        fail(f"{rk}.{k}", "an external row has no protocol/name")
            else:
                proto = r.get("protocol")
                if not isinstance(proto, str) or not _PROTOCOL.match(proto):
                    fail(f"{rk}.protocol", f"must be a string like \"10x3\", got {proto!r}")
                ids = [r["experiment"]] if kind == "experiment" else r["ensemble"]
                if kind == "ensemble":
                    if not isinstance(ids, list) or len(ids) < 2:
                        fail(f"{rk}.ensemble", "must be a list of at least two experiment ids")
                    name = r.get("name")
                    if not isinstance(name, str) or not _NAME.match(name):
                        fail(f"{rk}.name", f"an ensemble row needs a directory-safe `name`, got {name!r}")
                    prev = names.get(name)
                    if prev is not None and prev != (tuple(ids), proto):
                        fail(f"{rk}.name", f"`{name}` already names a different ensemble")
                    names[name] = (tuple(ids), proto)
                elif "name" in r:
                    fail(f"{rk}.name", "only ensemble rows have a name")
                for i in ids:
                    if not isinstance(i, str) or i not in known:
                        fail(f"{rk}.{kind}", f"unknown experiment id {i!r} (no params/experiments/{i}.yaml)")
            ds = r.get("dataset", t.get("dataset"))
            if "dataset" in r and r["dataset"] not in DATASETS:
                fail(f"{rk}.dataset", f"must be one of {sorted(DATASETS)}")
            if ds not in DATASETS:
                fail(f"{rk}.dataset", f"row needs a dataset (table says {t.get('dataset')!r})")
            if "section" in r and r["section"] not in SECTIONS:
                fail(f"{rk}.section", f"must be one of {sorted(SECTIONS)}")
            for k in ("backbone", "input", "note"):
                if k in r and not isinstance(r[k], str):
                    fail(f"{rk}.{k}", f"must be a string, got {r[k]!r}")
    return tables


def load_tables(path: str | Path | None = None) -> list[dict]:
    """Read and validate params/tables.yaml; rows get `kind`, `dataset` and `members` filled in."""
    path = Path(path) if path is not None else TABLES_PATH
    from smallbig.yamlsafe import YamlInputError, load_yaml_file

    try:
        data = load_yaml_file(path)
    except YamlInputError as e:
        raise TablesError(str(e)) from None
    tables = validate_tables(data, path)
    for t in tables:
        for r in t["rows"]:
            r["kind"] = next(k for k in ("experiment", "ensemble", "external") if k in r)
            r.setdefault("dataset", t.get("dataset"))
            r["members"] = ([r["experiment"]] if r["kind"] == "experiment"
                            else list(r.get("ensemble", [])))
    return tables


def experiment_tables(tables: list[dict]) -> dict[str, list[int]]:
    """Experiment id -> sorted table numbers where it appears (as a row or an ensemble member)."""
    out: dict[str, set[int]] = {}
    for t in tables:
        for r in t["rows"]:
            for i in r.get("members", []):
                out.setdefault(i, set()).add(t["number"])
    return {k: sorted(v) for k, v in sorted(out.items())}


def required_evaluations(tables: list[dict]) -> list[tuple[str, str]]:
    """(experiment id, protocol) pairs the tables need, in first-use order."""
    seen: list[tuple[str, str]] = []
    for t in tables:
        for r in t["rows"]:
            for i in r.get("members", []):
                if (i, r["protocol"]) not in seen:
                    seen.append((i, r["protocol"]))
    return seen


def required_ensembles(tables: list[dict]) -> dict[str, dict]:
    """Ensemble name -> {"members": [...], "protocol": ...} (for the workflow)."""
    out = {}
    for t in tables:
        for r in t["rows"]:
            if r["kind"] == "ensemble":
                out[r["name"]] = {"members": list(r["ensemble"]), "protocol": r["protocol"]}
    return out
