"""Reading a recipe file: UTF-8 YAML, one line per syntax error, no key given twice in one mapping
(YAML would silently keep the last one), and no alias that expands the file beyond `MAX_NODES` values
(a "billion laughs": a 1 KB file of nested aliases is gigabytes once expanded)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from llmtune.errors import Problem, RecipeError

# Values (mappings, lists, scalars) a recipe may hold once its aliases are expanded. A large recipe holds a
# few hundred; aliases and merge keys (``<<: *defaults``) that share a section stay far below this.
MAX_NODES = 10_000


def read_recipe_file(path: str | os.PathLike[str]) -> Any:
    """A recipe file's YAML as plain data (its ``name`` defaults to the file's stem); not validated yet.

    A key given twice in one mapping is an error: YAML would silently keep the last one (a searched
    ``lora_r: [8, 16]`` followed by ``lora_r: 8`` would search nothing)."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError([Problem("", f"recipe file {str(p)!r} not found")], str(p))
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise RecipeError([Problem("", f"the file is not UTF-8 text (line {line} has the byte 0x{raw[e.start]:02x}); "
                                       "save it as UTF-8")], str(p)) from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise RecipeError([Problem("", f"the file holds a NUL byte (line {line}): it is not a text file, or it "
                                       "was cut or copied badly; save the recipe as plain UTF-8 text")], str(p))
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # reads the whole text: a character YAML refuses raises here
        node = loader.get_single_node()
        too_big = _expansion_problem(node) if node is not None else None
        if too_big:
            raise RecipeError([Problem("", too_big)], str(p))
        duplicates = _duplicate_keys(node, text.splitlines()) if node is not None else []
        if duplicates:
            raise RecipeError(duplicates, str(p))
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        raise RecipeError([Problem("", f"not valid YAML: {_yaml_problem(e)}; fix the file")], str(p)) from None
    finally:
        if loader is not None:
            loader.dispose()
    if isinstance(data, dict) and "name" not in data:
        data["name"] = p.stem
    return data


def _expansion_problem(root: yaml.Node) -> str | None:
    """Why the document is too large once its aliases are expanded (or refers to itself), or None.

    Counted on the composed nodes, where an alias is the same node object again, with each node's expanded
    size computed once: the count costs the file's size, not the expansion's."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise RecursionError
        open_nodes.add(key)
        children: list[yaml.Node] = []
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_NODES:
                break
        open_nodes.discard(key)
        sizes[key] = total
        return total

    try:
        n = size(root)
    except RecursionError:
        return ("an alias (*name) refers to a mapping or list that holds it: the recipe would be infinite; "
                "write the values out")
    if n > MAX_NODES:
        return (f"its aliases (*name) expand it to more than {MAX_NODES:,} values: aliases are for sharing a "
                "few settings (e.g. <<: *defaults), and this one multiplies them (a \"billion laughs\" file?); "
                "write the values out")
    return None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """What the YAML parser says, on one line, with line and column counted from 1."""
    mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(error).split())
    where = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, start = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and start is not None:
        where += f" ({context} from line {start.line + 1}, column {start.column + 1})"
    return where


def _duplicate_keys(node: yaml.Node, lines: list[str], path: str = "", seen: set[int] | None = None) -> list[Problem]:
    """A problem per key given twice in one mapping (merge keys ``<<`` aside: overriding is what they are for)."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias of a node already walked
        return []
    seen.add(id(node))
    problems: list[Problem] = []
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key, value in node.value:
            name = str(key.value) if isinstance(key, yaml.ScalarNode) else None
            sub = f"{path}.{name}" if path and name is not None else (name or path)
            if name is not None and key.tag != "tag:yaml.org,2002:merge":
                line = key.start_mark.line
                if name in first:
                    problems.append(Problem(sub, f"is given twice, on line {first[name] + 1} ({lines[first[name]].strip()!r}) "
                                                 f"and line {line + 1} ({lines[line].strip()!r}); YAML would keep only the "
                                                 "last one, silently; keep one"))
                else:
                    first[name] = line
            problems += _duplicate_keys(value, lines, sub, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            problems += _duplicate_keys(item, lines, f"{path}[{i}]", seen)
    return problems
