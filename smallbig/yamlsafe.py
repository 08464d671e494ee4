"""Reading YAML that a user hands us (params files, overlays, table definitions) without letting
the file abuse the reader.

`load_yaml_file(path)` refuses, with one `PATH[:LINE]: problem` message (:class:`YamlInputError`):

- anything that is not a regular file (a FIFO is never opened, so it cannot hang the reader;
  directories, sockets and devices are named as such), and files over ``MAX_BYTES``;
- bytes that are not UTF-8 text (binary garbage), NUL bytes and other control characters;
- an empty document (only whitespace or comments);
- duplicate keys in one mapping (YAML would keep the last one silently) and keys that are not
  strings;
- aliases that expand beyond ``MAX_NODES`` nodes ("billion laughs"), aliases that refer to
  themselves, nesting deeper than ``MAX_DEPTH``;
- `.nan` / `.inf` numbers (a schema's `minimum` does not catch NaN).

Nothing here imports anything heavy; the checks run on the composed node graph, before any
Python object is built, so a 1 KB alias bomb costs microseconds.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from smallbig.fsutil import not_regular

MAX_BYTES = 1_000_000  # the largest params file in the repository is ~17 KB
MAX_NODES = 100_000  # after alias expansion
MAX_DEPTH = 100
_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlInputError(ValueError):
    """A YAML input file cannot be used. The message names the file (and line) and the problem."""


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def read_text(path: Path, max_bytes: int = MAX_BYTES) -> str:
    """The file's text, after the checks that need no parsing (kind, size, UTF-8)."""
    kind = not_regular(path)
    if kind == "missing":
        raise YamlInputError(f"{path}: file not found")
    if kind:
        raise YamlInputError(
            f"{path}: is {kind}, not a YAML file" if kind.startswith("a ") else f"{path}: {kind}"
        )
    st = os.stat(path)
    if st.st_size > max_bytes:
        raise YamlInputError(
            f"{path}: {st.st_size / 1e6:.1f} MB; a YAML input may be at most "
            f"{max_bytes / 1e6:g} MB (is this the right file?)"
        )
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise YamlInputError(f"{path}: cannot be read: {e.strerror or e}") from None
    if len(raw) > max_bytes:  # grew after the stat
        raise YamlInputError(f"{path}: larger than {max_bytes / 1e6:g} MB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise YamlInputError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
            f"{e.start}); is this a binary file?"
        ) from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise YamlInputError(f"{path}:{line}: contains NUL bytes; is this a binary file?")
    return text


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, non-string keys and non-finite floats."""


def _construct_mapping(loader: _Loader, node: MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == _MERGE_TAG:
            continue
        if not isinstance(key_node, ScalarNode):
            raise ConstructorError(
                None,
                None,
                "a mapping key must be a plain string, not a "
                f"{'list' if isinstance(key_node, SequenceNode) else 'mapping'}",
                key_node.start_mark,
            )
        key = loader.construct_object(key_node)
        if not isinstance(key, str):
            raise ConstructorError(
                None, None, f"key {_short(key)} is not a string (quote it)", key_node.start_mark
            )
        if key in seen:
            raise ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first at line {seen[key] + 1}); "
                "YAML would silently keep the last value",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    loader.flatten_mapping(node)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


def _construct_float(loader: _Loader, node: ScalarNode) -> float:
    value = yaml.SafeLoader.construct_yaml_float(loader, node)
    if not math.isfinite(value):
        raise ConstructorError(
            None, None, f"{node.value!r}: NaN and infinity are not allowed", node.start_mark
        )
    return value


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def _check_graph(root: Node, max_nodes: int, max_depth: int) -> None:
    """Expanded size and depth of the node graph, each node visited once (aliases are shared
    nodes in the graph, so an alias bomb is a small graph with a huge expansion)."""
    size: dict[int, int] = {}
    active: set[int] = set()

    def visit(node: Node, depth: int) -> int:
        if depth > max_depth:
            raise ConstructorError(None, None, f"nested deeper than {max_depth} levels", node.start_mark)
        k = id(node)
        if k in size:
            return size[k]
        if k in active:
            raise ConstructorError(
                None,
                None,
                "an alias refers to the node that contains it (a recursive structure)",
                node.start_mark,
            )
        active.add(k)
        n = 1
        if isinstance(node, SequenceNode):
            for child in node.value:
                n += visit(child, depth + 1)
                if n > max_nodes:
                    break
        elif isinstance(node, MappingNode):
            for kn, vn in node.value:
                n += visit(kn, depth + 1) + visit(vn, depth + 1)
                if n > max_nodes:
                    break
        active.discard(k)
        if n > max_nodes:
            raise ConstructorError(
                None,
                None,
                f"expands to more than {max_nodes:,} values through aliases/anchors (an alias bomb?)",
                node.start_mark,
            )
        size[k] = n
        return n

    visit(root, 0)


def _where(path, err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
    context = getattr(err, "context", None)
    text = f"{context}, {problem}" if context and context not in problem else problem
    if "'\\t'" in text:
        text += "; YAML indents with spaces, not tabs"
    if not isinstance(err, ConstructorError):
        text = f"not valid YAML: {text}"
    if mark is not None:
        return f"{path}:{mark.line + 1}: {text} (column {mark.column + 1})"
    return f"{path}: {text}"


def parse(text: str, path, max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH):
    """Parse one YAML document from text with every check above; returns Python objects."""
    loader = None
    try:
        loader = _Loader(text)  # the reader refuses control characters here
        root = loader.get_single_node()
        if root is None:
            raise YamlInputError(f"{path}: empty (no YAML content, only whitespace or comments)")
        _check_graph(root, max_nodes, max_depth)
        return loader.construct_document(root)
    except yaml.reader.ReaderError as e:
        line = text[: e.position].count("\n") + 1
        raise YamlInputError(
            f"{path}:{line}: character #x{e.character:04x} is not allowed in YAML "
            "(a control character; is this a binary file?)"
        ) from None
    except yaml.YAMLError as e:
        raise YamlInputError(_where(path, e)) from None
    except RecursionError:
        raise YamlInputError(f"{path}: nested too deeply to parse (more than {max_depth} levels?)") from None
    finally:
        if loader is not None:
            loader.dispose()


def load_yaml_file(path: str | Path, max_bytes: int = MAX_BYTES):
    """The parsed content of a user-supplied YAML file, or YamlInputError (`PATH[:LINE]: problem`)."""
    path = Path(path)
    return parse(read_text(path, max_bytes), path)
