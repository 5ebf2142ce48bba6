"""Strict reading of a YAML file into pydantic models, for params.yaml and recipes: duplicate keys refused (YAML
keeps the last, DVC refuses the file), and every validation problem as one line that names the file, the line
and the dotted key, with a did-you-mean for unknown keys. Knows nothing of medtune's sections."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from medtune.console import MedtuneError

# frozen: code cannot change params by accident; allow_inf_nan=False: .inf / .nan are refused
STRICT = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def problems_of(found: list[str]) -> None:
    """Raise a model's cross-field problems at once, "key: why" each (section_problems names section and line)."""
    if found:
        raise ValueError("\n".join(found))


def key_lines(text: str, source: str) -> dict[tuple, int]:
    """Line of every mapping key (by its path of keys); a key given twice in one mapping is an error."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise MedtuneError(f"{source}: not valid YAML: {' '.join(str(e).split())}") from None
    lines: dict[tuple, int] = {}

    def walk(node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value in node.value:
                key = path + (key_node.value,)
                if key in lines:
                    raise MedtuneError(f"{source}:{key_node.start_mark.line + 1}: {'.'.join(key)}: duplicate key "
                                       f"(first at line {lines[key]}); DVC refuses such a file")
                lines[key] = key_node.start_mark.line + 1
                walk(value, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, path + (i,))

    walk(root, ())
    return lines


def read_yaml(path: Path) -> tuple[dict, dict[tuple, int]]:
    """A YAML file's top-level mapping and the line of each key."""
    if not path.exists():
        raise MedtuneError(f"{path}: not found (run from the repository root)")
    text = path.read_text(encoding="utf-8")
    lines = key_lines(text, str(path))
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise MedtuneError(f"{path}: expected a mapping of sections at the top level")
    return data, lines


def section_problems(raw: Any, name: str, cls: type[BaseModel], lines: dict[tuple, int], source: str) -> tuple[Any, list[str]]:
    """(model, []) or (None, one line per problem, naming file:line and section.key)."""
    def where(loc: tuple) -> str:
        for n in range(len(loc), -1, -1):  # the deepest key that has a line
            if (name, *loc[:n]) in lines:
                return f"{source}:{lines[(name, *loc[:n])]}"
        return source

    try:
        return cls.model_validate(raw), []
    except ValidationError as e:
        out = []
        for err in e.errors():
            loc = tuple(err["loc"])
            key = ".".join([name, *map(str, loc)])
            if err["type"] == "extra_forbidden":
                fields = list(model_at(cls, loc[:-1]).model_fields)
                close = difflib.get_close_matches(str(loc[-1]), fields, n=1)
                hint = f"did you mean '{'.'.join([name, *map(str, loc[:-1]), close[0]])}'?" if close else f"known keys: {', '.join(fields)}"
                out.append(f"{where(loc)}: {key}: unknown key ({hint})")
            elif err["type"] == "missing":
                out.append(f"{where(loc[:-1])}: {key}: missing (every key must be set in params.yaml)")
            elif err["type"] == "value_error":  # a model validator's problems, "key: why" each
                for problem in str(err["ctx"]["error"]).split("\n"):
                    sub = tuple(problem.split(":", 1)[0].split("/")[0].split("."))
                    out.append(f"{where(loc + sub)}: {'.'.join([name, *map(str, loc)])}.{problem}")
            else:
                out.append(f"{where(loc)}: {key}: {err['msg'][0].lower() + err['msg'][1:]} (got {err['input']!r})")
        return None, out


def model_at(cls: type[BaseModel], loc: tuple) -> type[BaseModel]:
    """The model class of a nested location (for the keys it knows)."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = cls.model_fields[part].annotation
        args = getattr(field, "__args__", ())
        cls = next((a for a in (field, *args) if isinstance(a, type) and issubclass(a, BaseModel)), cls)
    return cls


def flat(d: dict, prefix: str = "") -> dict:
    """Nested sections as dotted keys: {"train": {"lora_r": 16}} -> {"train.lora_r": 16}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out
