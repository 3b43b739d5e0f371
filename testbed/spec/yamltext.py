"""YAML text to a checked node tree, with the line of every value: the one place a config file is read.

Refused here, each as ``FILE:LINE: field: message``: unreadable, oversized, binary or non-UTF-8
files, YAML syntax errors (also control characters and multiple documents), anything but a mapping
at the top, duplicate keys, keys that are not plain names, tags beyond YAML's plain types (no
``!!python/...``, ``!!binary`` or custom tags), recursive aliases and alias expansion beyond
``MAX_NODES`` (a "billion laughs" file), and nesting deeper than Python can walk.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from testbed.core.errors import ConfigError

MAX_FILE_BYTES = 8 << 20
MAX_NODES = 200_000  # values after alias expansion: far beyond any real experiment (regime_map: ~400)
PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map")}


@dataclass(frozen=True)
class ConfigProblem:
    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.message}"


def _fail(file: str, line: int, field: str, message: str) -> ConfigError:
    return ConfigError([ConfigProblem(file, line, field, message)])


def read_text(path: Path, what: str = "<file>") -> str:
    """The file's text, or a ConfigError naming the line of the first byte that is not UTF-8 text."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise _fail(str(path), 1, what, f"file of {path.stat().st_size} B: larger than {MAX_FILE_BYTES} B")
        data = path.read_bytes()
    except OSError as exc:
        raise _fail(str(path), 1, what, f"cannot read: {exc.strerror}") from None
    if b"\0" in data:
        line = data[:data.index(b"\0")].count(b"\n") + 1
        raise _fail(str(path), line, what, "binary file (NUL byte): expected UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise _fail(str(path), line, what, f"not UTF-8 text (byte 0x{data[exc.start]:02x}): expected UTF-8 text") from None


def compose(path: Path) -> yaml.MappingNode:
    """Read and compose ``path``; every problem raises a ConfigError with its line."""
    text = read_text(path)
    file = str(path)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.reader.ReaderError as exc:  # control characters: position, no mark
        raise _fail(file, text[:exc.position].count("\n") + 1, "<yaml>",
                    f"syntax error: character {exc.character!r} is not allowed in YAML") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise _fail(file, line, "<yaml>", f"syntax error: {getattr(exc, 'problem', None) or exc}") from None
    except RecursionError:
        raise _fail(file, 1, "<yaml>", "nested too deeply to read") from None
    if not isinstance(node, yaml.MappingNode):
        line = node.start_mark.line + 1 if node is not None else 1
        raise _fail(file, line, "<root>", "expected a mapping at the top level")
    problems = check_nodes(node, file)
    if problems:
        raise ConfigError(problems)
    return node


def check_nodes(root: yaml.Node, file: str) -> list[ConfigProblem]:
    """Duplicate keys, keys that are not plain names, unknown tags, recursive or exploding aliases."""
    problems: list[ConfigProblem] = []
    seen = 0
    stack: list[tuple[yaml.Node, tuple, frozenset]] = [(root, (), frozenset())]
    while stack:
        node, loc, above = stack.pop()
        seen += 1
        line = node.start_mark.line + 1
        if seen > MAX_NODES:
            return problems + [ConfigProblem(file, line, "<yaml>", f"too many values (over {MAX_NODES} after "
                                             "expanding aliases)")]
        if id(node) in above:
            return problems + [ConfigProblem(file, line, field_name(loc), "recursive alias (a value contains itself)")]
        if node.tag not in PLAIN_TAGS:
            problems.append(ConfigProblem(file, line, field_name(loc), f"tag {node.tag!r} is not allowed (plain "
                                          "YAML values only: strings, numbers, booleans, null, lists, mappings)"))
            continue
        inner = above | {id(node)}
        if isinstance(node, yaml.SequenceNode):
            stack += [(v, loc + (i,), inner) for i, v in reversed(list(enumerate(node.value)))]
        elif isinstance(node, yaml.MappingNode):
            problems += _keys(node, loc, file)
            stack += [(v, loc + (k.value,), inner) for k, v in reversed(node.value) if isinstance(k, yaml.ScalarNode)]
    return problems


def _keys(node: yaml.MappingNode, loc: tuple, file: str) -> list[ConfigProblem]:
    problems, first = [], {}
    for k, _ in node.value:
        line = k.start_mark.line + 1
        if not isinstance(k, yaml.ScalarNode) or k.tag != "tag:yaml.org,2002:str" or k.value == "":
            what = k.value if isinstance(k, yaml.ScalarNode) else type(k).__name__.replace("Node", "").lower()
            problems.append(ConfigProblem(file, line, field_name(loc) if loc else "<key>",
                                          f"key {what!r} is not a plain name (keys are unquoted words)"))
        elif k.value in first:
            problems.append(ConfigProblem(file, line, field_name(loc + (k.value,)),
                                          f"duplicate key {k.value!r} (first at line {first[k.value]})"))
        else:
            first[k.value] = line
    return problems


_CONSTRUCTOR = yaml.constructor.SafeConstructor()


def to_python(node: yaml.Node) -> Any:
    """Plain Python data of a checked node tree (no tag beyond ``PLAIN_TAGS`` reaches here)."""
    if isinstance(node, yaml.MappingNode):
        return {to_python(k): to_python(v) for k, v in node.value}
    if isinstance(node, yaml.SequenceNode):
        return [to_python(v) for v in node.value]
    if node.tag == "tag:yaml.org,2002:str":
        return node.value
    return _CONSTRUCTOR.construct_object(node, deep=True)


def line_of(node: yaml.Node | None, loc: tuple) -> int:
    """1-based line of the deepest node reachable along ``loc``."""
    line = node.start_mark.line + 1 if node is not None else 1
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == key), None)
            if match is None:
                break
            line = match[0].start_mark.line + 1
            node = match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def field_name(loc: tuple) -> str:
    """``('links', 2, 'b')`` -> ``links[2].b``."""
    parts: list[str] = []
    for key in loc:
        parts.append(f"[{key}]" if isinstance(key, int) else ("." if parts else "") + str(key))
    return "".join(parts) or "<root>"


_PATH = re.compile(r"^((?:[A-Za-z_]\w*|\[\d+\])(?:\.[A-Za-z_]\w*|\[\d+\])*): (.+)$", re.S)


def split_path(message: str) -> tuple[tuple, str]:
    """``"links[2].b: unknown node"`` -> ``(('links', 2, 'b'), 'unknown node')``: validators name the
    field a message is about at its start, relative to the model they check."""
    m = _PATH.match(message)
    if not m:
        return (), message
    loc: list = []
    for name, index in re.findall(r"([A-Za-z_]\w*)|\[(\d+)\]", m.group(1)):
        loc.append(int(index) if index else name)
    return tuple(loc), m.group(2)


@dataclass(frozen=True)
class Where:
    """Where a validated mapping sits: its file, the file's node tree and the mapping's location."""

    file: str
    root: yaml.Node | None
    under: tuple = ()

    def at(self, loc: tuple, message: str, *, parse: bool = False) -> ConfigProblem:
        """A problem at ``under + loc``; with ``parse``, a leading ``path: `` of the message goes deeper."""
        if parse:
            more, message = split_path(message)
            loc = tuple(loc) + more
        full = self.under + tuple(loc)
        return ConfigProblem(self.file, line_of(self.root, full), field_name(full), message)

    def deeper(self, loc: tuple) -> "Where":
        return Where(self.file, self.root, self.under + tuple(loc))
