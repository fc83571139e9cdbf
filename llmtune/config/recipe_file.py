"""Reading a recipe file: UTF-8 YAML, one line per syntax error, and no key given twice in one mapping
(YAML would silently keep the last one)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from llmtune.errors import Problem, RecipeError


def read_recipe_file(path: str | os.PathLike) -> Any:
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
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        duplicates = _duplicate_keys(node, text.splitlines()) if node is not None else []
        if duplicates:
            raise RecipeError(duplicates, str(p))
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        raise RecipeError([Problem("", f"not valid YAML: {_yaml_problem(e)}; fix the file")], str(p)) from None
    finally:
        loader.dispose()
    if isinstance(data, dict) and "name" not in data:
        data["name"] = p.stem
    return data


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
