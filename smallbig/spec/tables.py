"""`params/tables.yaml`: the paper's Tables 2-11 row by row, and where each of our numbers comes
from. `load_tables()` reads and validates it; every problem raises :class:`TablesError` naming
the file, the key (e.g. `tables[8].rows[16].protocol`) and the problem.

Row kinds:
  experiment: <id> + protocol      our number = results/<run>/<id>/eval-<protocol>/metrics.json
  ensemble: [<id>, ...] + protocol + name
                                   results/<run>/ensembles/<name>/metrics.json (or fused here from
                                   the members' eval-<protocol>/scores.npz)
  external: true                   another paper's number, shown as reported

Verdicts (docs/reports.md): `verdicts: {tolerance, bootstrap: {resamples, confidence, seed}}` at
the top (defaults below), `tolerance:` per table overrides it. A table's `claims:` are the
orderings the paper states within it (`order: [best, ..., worst]` or `better: A` + `than: [B, ...]`),
naming rows of the same table by `key:` or by label (each reference must name exactly one row).
`load_tables()` fills in every table's `tolerance` and `bootstrap` and each claim's `pairs`
(row index, row index): the first row is claimed to beat the second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema

from smallbig.config import REPO_ROOT, ParamsError, experiment_ids
from smallbig.yamlsafe import YamlInputError, load_yaml_file

TABLES_PATH = REPO_ROOT / "params" / "tables.yaml"
SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "tables.schema.yaml"
_KINDS = ("experiment", "ensemble", "external")
DEFAULT_TOLERANCE = 0.5  # Top-1 points either side of the paper's number (the zoo's practice)
DEFAULT_BOOTSTRAP = {"resamples": 2000, "confidence": 0.95, "seed": 0}
DATASETS = {"kinetics400", "sthv1", "sthv2"}
_SCHEMA: dict | None = None


class TablesError(ParamsError):
    """params/tables.yaml is missing or invalid; the message names the file, key and problem.
    (A ParamsError, so the `smallbig` CLI reports it as one: exit code 2, no traceback.)"""


def _schema() -> dict:
    global _SCHEMA
    if _SCHEMA is None:
        _SCHEMA = load_yaml_file(SCHEMA_PATH)
    return _SCHEMA


def _key(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _message(e: jsonschema.ValidationError) -> tuple[str, str]:
    """(key, problem) for the most useful error of a schema failure."""
    key = _key(e.absolute_path)
    inst = e.instance
    if e.validator == "required":
        missing = [k for k in e.validator_value if not (isinstance(inst, dict) and k in inst)]
        return (f"{key}.{missing[0]}" if key != "(top level)" else missing[0]), "missing"
    if e.validator == "additionalProperties" and isinstance(inst, dict):
        allowed = set(e.schema.get("properties", {}))
        return key, f"unknown key(s) {sorted(set(inst) - allowed)}; allowed {sorted(allowed)}"
    if e.validator == "oneOf" and isinstance(inst, dict) and "text" in e.schema.get("properties", {}):
        return key, "a claim needs either `order: [row, row, ...]` or `better: row` + `than: [row, ...]`"
    if e.validator == "oneOf" and isinstance(inst, dict) and "paper" in e.schema.get("properties", {}):
        kinds = [k for k in _KINDS if k in inst]
        return key, f"needs exactly one of experiment / ensemble / external, has {kinds or 'none'}"
    if e.validator == "not" and isinstance(inst, dict):
        forbidden = [k for k in (e.validator_value or {}).get("required", []) if k in inst]
        kind = next((k for k in _KINDS if k in inst), "this")
        article = "an" if kind[0] in "ae" else "a"
        return (
            f"{key}.{forbidden[0]}" if forbidden else key,
            f"{article} {kind} row has no {'/'.join(forbidden) or 'such key'}",
        )
    if e.validator == "oneOf" and e.schema.get("oneOf", [{}])[0].get("type") == "number":
        return key, f"must be a number or null, got {inst!r}"
    text = e.message if len(e.message) <= 240 else e.message[:240] + "…"
    return key, text


_PRIORITY = {"oneOf": 0, "additionalProperties": 1, "required": 2, "not": 3}


def _pick(errors: list[jsonschema.ValidationError]) -> jsonschema.ValidationError:
    """The error to report: the first place (in document order) that fails; there, a row's
    kind conflict first, then unknown keys, missing keys, keys its kind forbids, the rest."""
    first = list(errors[0].absolute_path)
    here = [e for e in errors if list(e.absolute_path) == first]
    return min(here, key=lambda e: (_PRIORITY.get(str(e.validator), 9), -len(list(e.path))))


def validate_tables(
    data: Any, source: str | Path = TABLES_PATH, known_ids: set[str] | None = None
) -> list[dict]:
    """Check a tables document (schema, then the paper's order, known experiment ids, one meaning
    per ensemble name, a dataset for every row); return its list of tables."""
    src = str(source)

    def fail(key: str, problem: str):
        raise TablesError(f"{src}: {key}: {problem}")

    if not isinstance(data, dict) or "tables" not in data:
        fail("(top level)", "must be a mapping with a `tables:` list")
    validator = jsonschema.Draft202012Validator(_schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        fail(*_message(_pick(errors)))
    known = set(experiment_ids()) if known_ids is None else set(known_ids)
    numbers: list[int] = []
    names: dict[str, tuple] = {}
    for ti, t in enumerate(data["tables"]):
        tk = f"tables[{ti}]"
        if t["number"] in numbers:
            fail(f"{tk}.number", f"table {t['number']} appears twice")
        if numbers and t["number"] < numbers[-1]:
            fail(f"{tk}.number", "tables must be in the paper's order")
        numbers.append(t["number"])
        for ri, r in enumerate(t["rows"]):
            rk = f"{tk}.rows[{ri}]"
            kind = next(k for k in _KINDS if k in r)
            if kind != "external":
                ids = [r["experiment"]] if kind == "experiment" else r["ensemble"]
                for i in ids:
                    if i not in known:
                        fail(f"{rk}.{kind}", f"unknown experiment id {i!r} (no params/experiments/{i}.yaml)")
            if kind == "ensemble":
                prev = names.get(r["name"])
                if prev is not None and prev != (tuple(r["ensemble"]), r["protocol"]):
                    fail(f"{rk}.name", f"`{r['name']}` already names a different ensemble")
                names[r["name"]] = (tuple(r["ensemble"]), r["protocol"])
            if r.get("dataset", t.get("dataset")) not in DATASETS:
                fail(f"{rk}.dataset", f"row needs a dataset (table says {t.get('dataset')!r})")
        keys = [r["key"] for r in t["rows"] if "key" in r]
        for ri, r in enumerate(t["rows"]):
            if "key" in r and keys.count(r["key"]) > 1:
                fail(f"{tk}.rows[{ri}].key", f"`{r['key']}` names more than one row of the table")
        for ci, c in enumerate(t.get("claims") or []):
            claim_pairs(t, c, lambda key, problem, ci=ci, tk=tk: fail(f"{tk}.claims[{ci}].{key}", problem))
    return data["tables"]


def _row_index(table: dict, ref: str, fail) -> int:
    """The one row of `table` whose key, else label, is `ref`."""
    keyed = [i for i, r in enumerate(table["rows"]) if r.get("key") == ref]
    labelled = [i for i, r in enumerate(table["rows"]) if r["label"] == ref]
    hits = keyed or labelled
    if len(hits) != 1:
        what = (
            "no row has this key or label"
            if not hits
            else f"{len(hits)} rows are labelled so; give them a `key:`"
        )
        fail(f"{ref!r}: {what}")
    return hits[0]


def claim_pairs(table: dict, claim: dict, fail) -> list[tuple[int, int]]:
    """(better row, worse row) index pairs a claim makes; `fail(key, problem)` raises."""
    field = "order" if "order" in claim else "than"
    refs = claim["order"] if field == "order" else [claim["better"], *claim["than"]]
    idx = [_row_index(table, ref, lambda problem: fail(field, problem)) for ref in refs]
    if len(set(idx)) != len(idx):
        fail(field, "names the same row twice")
    if field == "order":
        return list(zip(idx, idx[1:]))
    return [(idx[0], j) for j in idx[1:]]


def load_tables(path: str | Path | None = None) -> list[dict]:
    """Read and validate params/tables.yaml; rows get `kind`, `dataset` and `members` filled in."""
    path = Path(path) if path is not None else TABLES_PATH
    try:
        data = load_yaml_file(path)
    except YamlInputError as e:
        raise TablesError(str(e)) from None
    tables = validate_tables(data, path)
    settings = data.get("verdicts") or {}
    default_tol = settings.get("tolerance", DEFAULT_TOLERANCE)
    bootstrap = {**DEFAULT_BOOTSTRAP, **(settings.get("bootstrap") or {})}
    for t in tables:
        t.setdefault("tolerance", default_tol)
        t["bootstrap"] = dict(bootstrap)
        t.setdefault("claims", [])
        for c in t["claims"]:
            c["pairs"] = claim_pairs(t, c, lambda key, problem: None)
    for t in tables:
        for r in t["rows"]:
            r["kind"] = next(k for k in ("experiment", "ensemble", "external") if k in r)
            r.setdefault("dataset", t.get("dataset"))
            r["members"] = [r["experiment"]] if r["kind"] == "experiment" else list(r.get("ensemble", []))
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
