"""params/tables.yaml: every row of the paper's Tables 2-11, consistent with params/experiments."""

import copy

import pytest
import yaml

from smallbig.config import experiment_ids, experiment_path, load_params
from smallbig.spec.tables import (
    TABLES_PATH,
    TablesError,
    experiment_tables,
    load_tables,
    required_ensembles,
    required_evaluations,
    validate_tables,
)

# rows of /work/shared/paper/tables.md (Table 11: one row per dataset the paper gives numbers for)
EXPECTED_ROWS = {2: 3, 3: 5, 4: 6, 5: 5, 6: 7, 7: 3, 8: 4, 9: 2, 10: 26, 11: 26}


def test_tables_load_and_cover_the_paper():
    tables = load_tables()
    assert [t["number"] for t in tables] == list(range(2, 12))
    assert {t["number"]: len(t["rows"]) for t in tables} == EXPECTED_ROWS


def test_every_referenced_id_exists_and_tables_fields_agree():
    tables = load_tables()
    used = experiment_tables(tables)
    ids = set(experiment_ids())
    assert set(used) <= ids
    assert set(used) == ids, f"experiments in no table: {sorted(ids - set(used))}"
    for exp_id in ids:
        declared = sorted(yaml.safe_load(experiment_path(exp_id).read_text())["tables"])
        assert declared == used[exp_id], f"{exp_id}: tables: {declared} but appears in {used[exp_id]}"


def test_protocols_are_ones_the_experiment_evaluates():
    for exp_id, proto in required_evaluations(load_tables()):
        protos = load_params(experiment_path(exp_id))["test"]["protocols"]
        assert proto in protos, f"{exp_id} is needed at {proto} but its test.protocols is {protos}"


def test_ensembles_and_externals():
    tables = load_tables()
    ens = required_ensembles(tables)
    assert ens["k400-sb-en-r50-r101-4x3"] == {
        "members": ["k400-r50-sb-full", "k400-r101-sb-typical-32f"],
        "protocol": "4x3",
    }
    assert len(ens) == 5
    t10 = next(t for t in tables if t["number"] == 10)
    assert sum(r["kind"] == "external" for r in t10["rows"]) == 23
    # baselines that repeat point at the one C2D-R23 experiment
    for t in tables:
        if 3 <= t["number"] <= 8:
            assert t["rows"][0]["experiment"] == "k400-r23-c2d"


def _doc():
    return yaml.safe_load(TABLES_PATH.read_text())


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda d: d["tables"][0]["rows"][0].update(experiment="no-such-id"), "tables[0].rows[0].experiment"),
        (lambda d: d["tables"][0]["rows"][0].pop("protocol"), "tables[0].rows[0].protocol"),
        (lambda d: d["tables"][0]["rows"][0].update(external=True), "tables[0].rows[0]"),
        (lambda d: d["tables"][1]["rows"][2]["paper"].update(top1="69"), "tables[1].rows[2].paper.top1"),
        (lambda d: d["tables"][2]["rows"][1].update(colour="red"), "tables[2].rows[1]"),
        (lambda d: d["tables"][8]["rows"][25].pop("name"), "tables[8].rows[25].name"),
        (lambda d: d["tables"][3].update(number=2), "tables[3].number"),
    ],
)
def test_bad_tables_name_file_and_key(tmp_path, mutate, key):
    d = copy.deepcopy(_doc())
    mutate(d)
    p = tmp_path / "tables.yaml"
    p.write_text(yaml.safe_dump(d, allow_unicode=True))
    with pytest.raises(TablesError) as e:
        load_tables(p)
    assert str(p) in str(e.value) and key + ":" in str(e.value)


def test_missing_and_broken_file(tmp_path):
    with pytest.raises(TablesError, match="file not found"):
        load_tables(tmp_path / "nope.yaml")
    p = tmp_path / "t.yaml"
    p.write_text("tables: [\n")
    with pytest.raises(TablesError, match="not valid YAML"):
        load_tables(p)
    with pytest.raises(TablesError, match="tables"):
        validate_tables({"rows": []}, "x.yaml")
