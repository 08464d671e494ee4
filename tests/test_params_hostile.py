"""Hostile params files: every bad input is one `FILE[:LINE]: problem` line and exit 2 — never a
traceback, never a hang, never a silently accepted mistake. Plus a seeded fuzz of a few hundred
malformed documents against the loader, and a closed stdout pipe."""

from __future__ import annotations

import copy
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from smallbig import config

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "params" / "base.yaml"
EXP = REPO / "params" / "experiments" / "k400-r50-sb-full.yaml"
EXPS = sorted((REPO / "params" / "experiments").glob("*.yaml"))
SMALLBIG = [sys.executable, "-m", "smallbig"]


def run_cli(*args, timeout=60, **kw):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [*SMALLBIG, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env, **kw
    )


def exp_text(base_path: Path) -> str:
    """The R50 experiment, pointing at a (possibly broken) base file."""
    return EXP.read_text().replace("../base.yaml", str(base_path))


def alias_bomb() -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, cur in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


# Each kind: (name, writer(tmp) -> path of the file to validate, expected words in the message)
def _w(text: str | bytes, name="bad.yaml"):
    def write(tmp: Path) -> Path:
        p = tmp / name
        (p.write_bytes if isinstance(text, bytes) else p.write_text)(text)
        return p

    return write


def _fifo(tmp):
    p = tmp / "fifo.yaml"
    os.mkfifo(p)
    return p


def _socket(tmp):
    p = tmp / "sock.yaml"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(p))
    return p


def _dir(tmp):
    p = tmp / "dir.yaml"
    p.mkdir()
    return p


def _big(tmp):
    p = tmp / "big.yaml"
    with open(p, "w") as f:  # 50 MB of valid YAML: the size is refused before parsing
        f.write("lr_list:\n")
        line = "- 0.1\n"
        f.write(line * (50_000_000 // len(line)))
    return p


def _in_base(text_edit):
    """An experiment whose base file is the real one edited by text_edit."""

    def write(tmp):
        base = tmp / "base.yaml"
        base.write_text(text_edit(BASE.read_text()))
        exp = tmp / "exp.yaml"
        exp.write_text(exp_text(base))
        return exp

    return write


def _huge_value(tmp):
    return _in_base(lambda t: t.replace("epochs: 110", "epochs: '" + "9" * 900_000 + "'"))(tmp)


KINDS = [
    ("binary garbage", _w(random.Random(1).randbytes(4096)), "not UTF-8"),
    ("latin-1 text", _w("model:\n  name: caf\xe9\n".encode("latin-1")), "not UTF-8"),
    ("NUL bytes", _w(b"a: 1\n\x00\x00b: 2\n"), "NUL"),
    ("alias bomb", _w(alias_bomb()), "alias bomb"),
    ("recursive alias", _w("a: &x [1, *x]\n"), "recursive"),
    (
        "duplicate top-level key",
        _w(EXP.read_text().replace("../base.yaml", str(BASE)) + "id: k400-r50-sb-full\n"),
        "duplicate key 'id'",
    ),
    (
        "duplicate nested key",
        _in_base(lambda t: t.replace("train:\n", "train:\n  epochs: 3\n  epochs: 4\n", 1)),
        "duplicate key 'epochs'",
    ),
    ("integer key", _w("1: a\n"), "not a string"),
    ("null key", _w("~: a\n"), "not a string"),
    ("list key", _w("? [a, b]\n: c\n"), "plain string"),
    ("50 MB file", _big, "at most 1 MB"),
    ("empty file", _w(""), "empty"),
    ("only comments", _w("# nothing here\n\n   \n"), "empty"),
    ("top level is a list", _w("- a\n- b\n"), "must be a mapping"),
    ("top level is a scalar", _w("hello\n"), "must be a mapping"),
    ("FIFO", _fifo, "FIFO"),
    ("socket", _socket, "socket"),
    ("directory", _dir, "directory"),
    ("missing file", lambda tmp: tmp / "nope.yaml", "file not found"),
    ("extends a missing file", _w("extends: nowhere.yaml\n"), "file not found"),
    ("extends loop", _w("extends: bad.yaml\n"), "loops back"),
    (
        "extends a binary file",
        lambda tmp: (_w(b"\xff\xfe\x00garbage", "b.bin")(tmp), _w("extends: b.bin\n")(tmp))[1],
        "not UTF-8",
    ),
    ("NaN value", _in_base(lambda t: t.replace("weight_decay: 1.0e-4", "weight_decay: .nan")), "NaN"),
    (
        "infinite value",
        _in_base(lambda t: t.replace("weight_decay: 1.0e-4", "weight_decay: -.inf")),
        "infinity",
    ),
    ("deep nesting", _w("a: " + "[" * 5000 + "]" * 5000 + "\n"), "nested"),
    ("invalid YAML syntax", _w("model: {depth: 50\n"), ":2:"),
    ("tab indentation", _w("model:\n\tdepth: 50\n"), "spaces, not tabs"),
    (
        "python object tag",
        _w("a: !!python/object/apply:os.system ['echo pwned']\n"),
        "could not determine a constructor",
    ),
    ("unknown key", _in_base(lambda t: t + "\nbogus_section: 1\n"), "unknown key(s) 'bogus_section'"),
    ("wrong type, huge value", _huge_value, "characters cut"),
]


@pytest.mark.parametrize("name,write,expect", KINDS, ids=[k[0] for k in KINDS])
def test_bad_params_file_is_one_clear_error(tmp_path, name, write, expect):
    path = write(tmp_path)
    r = run_cli("params", "validate", path, timeout=60)
    assert r.returncode == 2, (name, r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(r.stderr) < 2500, f"{name}: {len(r.stderr)} bytes on stderr"
    assert expect in r.stderr, (name, r.stderr)
    # the message names the file (for extends: the file that has the problem)
    assert str(tmp_path) in r.stderr or str(BASE) in r.stderr, r.stderr
    assert r.stdout == ""


def test_bad_kinds_count():
    assert len(KINDS) >= 30


def test_bad_overlay_and_bad_params_refused_by_train(tmp_path):
    garbage = tmp_path / "overlay.yaml"
    garbage.write_bytes(random.Random(2).randbytes(2048))
    r = run_cli("train", EXP, "--overlay", garbage, "--out", tmp_path / "run")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{garbage}:1: not UTF-8" in r.stderr
    r = run_cli("train", garbage, "--out", tmp_path / "run")
    assert r.returncode == 2 and "Traceback" not in r.stderr and str(garbage) in r.stderr, r.stderr[-2000:]
    bad_section = tmp_path / "ov2.yaml"
    bad_section.write_text("all: [1, 2]\n")
    r = run_cli("train", EXP, "--overlay", bad_section, "--out", tmp_path / "run")
    assert r.returncode == 2 and f"{bad_section}: all: must be a mapping" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_valid_variants_still_accepted(tmp_path):
    """BOM, CRLF line endings, a YAML merge key: valid YAML stays valid."""
    exp = tmp_path / "exp.yaml"
    exp.write_bytes(b"\xef\xbb\xbf" + exp_text(BASE).replace("\n", "\r\n").encode())
    ref = config.load_params(EXP)
    got = config.load_params(exp)
    assert got["model"] == ref["model"] and got["train"] == ref["train"]
    base = tmp_path / "base.yaml"
    base.write_text(BASE.read_text() + "\n_anchor: &opt {momentum: 0.9}\n")
    merged = yaml.safe_load(base.read_text())
    assert merged["_anchor"] == {"momentum": 0.9}


def test_params_list_into_closed_pipe():
    r = subprocess.run(
        f"{sys.executable} -m smallbig params list | head -2",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert r.stdout.splitlines() == config.experiment_ids()[:2]
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


# --------------------------------------------------------------------------- fuzz
SPECIAL = list(":{}[]&*!|>'\"%@`#,-? \t\n") + [
    "&a ",
    "*a",
    "<<: ",
    "!!python/object:os.system ",
    "~",
    ".nan",
    "1e999",
    "- ",
    "\r\n",
    "\ufeff",
    "é",
    "0x",
    "null",
    "\x07",
    "\\u0000",
]
VALUES = [
    "[]",
    "{}",
    "null",
    "-1",
    "0",
    "1e9",
    "'x'",
    "[1, 2]",
    "{a: 1}",
    "true",
    "2020-01-01",
    "99999999999999999999999",
    "'T'",
    "[T, 3, 3]",
    "''",
    "*nope",
    "&x 3",
]
PY_VALUES = [
    None,
    [],
    {},
    -1,
    0,
    1,
    2.5,
    10**30,
    "x",
    "T",
    "10x3",
    "0x0",
    [1, 2],
    ["T", 3, 3],
    [3, 3, 3],
    {"a": 1},
    True,
    "none",
    "../x.pth",
    "res2",
    "smallbig",
    "dense",
]


def _mutate_text(rng: random.Random, text: str) -> str:
    for _ in range(rng.randint(1, 4)):
        lines = text.splitlines(keepends=True)
        op = rng.randrange(7)
        if op == 0 and text:
            i = rng.randrange(len(text))
            text = text[:i] + rng.choice(SPECIAL) + text[i:]
        elif op == 1 and text:
            i = rng.randrange(len(text))
            text = text[:i] + text[i + 1 :]
        elif op == 2:
            text = text[: rng.randrange(len(text) + 1)]
        elif op == 3 and lines:
            i = rng.randrange(len(lines))
            lines.insert(i, lines[i])
            text = "".join(lines)
        elif op == 4 and lines:
            i = rng.randrange(len(lines))
            if ":" in lines[i]:
                lines[i] = f"{lines[i].split(':')[0]}: {rng.choice(VALUES)}\n"
                text = "".join(lines)
        elif op == 5 and lines:
            del lines[rng.randrange(len(lines))]
            text = "".join(lines)
        else:
            text = text.replace("  ", "\t", 1) if rng.random() < 0.5 else text.replace("\n", "\n  ", 1)
    return text


def _paths(d, pre=()):
    yield pre
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _paths(v, pre + (k,))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from _paths(v, pre + (i,))


def _mutate_tree(rng: random.Random, tree: dict) -> dict:
    tree = copy.deepcopy(tree)
    for _ in range(rng.randint(1, 3)):
        where = rng.choice([p for p in _paths(tree) if p])
        parent = tree
        for k in where[:-1]:
            parent = parent[k]
        if rng.random() < 0.7:
            parent[where[-1]] = copy.deepcopy(rng.choice(PY_VALUES))
        else:
            parent.pop(where[-1])
    return tree


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzz_loader_never_raises_anything_but_params_error(tmp_path, seed):
    """300 malformed documents per seed (text mutations of the base or an experiment file, and
    type/shape mutations of the merged tree): each loads or raises ParamsError naming its file."""
    rng = random.Random(seed)
    outcomes = {"valid": 0, "ParamsError": 0}
    for i in range(300):
        base, exp = tmp_path / f"base{i}.yaml", tmp_path / f"exp{i}.yaml"
        src = rng.choice(EXPS)
        mode = rng.random()
        if mode < 0.35:
            base.write_text(_mutate_text(rng, BASE.read_text()))
            exp.write_text(src.read_text().replace("../base.yaml", base.name))
        elif mode < 0.7:
            base.write_text(BASE.read_text())
            exp.write_text(_mutate_text(rng, src.read_text().replace("../base.yaml", base.name)))
        else:
            exp.write_text(yaml.safe_dump(_mutate_tree(rng, config._load_chain(src))))
        try:
            config.load_params(exp)
            outcomes["valid"] += 1
        except config.ParamsError as e:
            outcomes["ParamsError"] += 1
            assert str(e).startswith(str(tmp_path)), str(e)[:500]
            assert len(str(e)) < 5000
    # the generator really produces broken documents (most of them) and some valid ones
    assert outcomes["ParamsError"] > 200 and outcomes["valid"] > 0, outcomes
