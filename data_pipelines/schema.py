"""Helpers for config schemas: the dataclasses a Hydra/OmegaConf node is checked against.

Shared by the data config (data_pipelines/config.py, data_pipelines/inspect.py) and the run's config in dsv4, which
imports it from here because data_pipelines imports nothing of dsv4. Nothing here knows a particular config."""

from __future__ import annotations

import typing
from dataclasses import MISSING, field, fields, make_dataclass
from typing import Any

from omegaconf import OmegaConf


def typed(schema: type, node: Any, prefix: str, error: type[Exception]) -> Any:
    """Merge a config node into a dataclass schema; unknown keys and wrong types raise `error` naming the key."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node if node is not None else {})
        return OmegaConf.to_object(merged)
    except Exception as e:  # omegaconf errors carry full_key
        key = getattr(e, "full_key", None) or ""
        msg = str(e).splitlines()[0]
        raise error(f"{prefix}.{key}: {msg}" if key else f"{prefix}: {msg}") from None


def config_schema(spec: type, name: str, module: str, doc: str) -> type:
    """A mutable dataclass called `name` (defined in `module`) with the fields, types and defaults of the frozen
    dataclass `spec`, so a settings object and its config node have one definition: OmegaConf refuses to set a
    field of a frozen dataclass node. `name` appears in OmegaConf's errors (e.g. "Key 'x' not in 'name'")."""
    hints = typing.get_type_hints(spec)  # real types: OmegaConf cannot read the spec module's string annotations
    schema_fields = []
    for f in fields(spec):
        if f.default is not MISSING:
            default = field(default=f.default)
        elif f.default_factory is not MISSING:
            default = field(default_factory=f.default_factory)
        else:
            default = field()
        schema_fields.append((f.name, hints[f.name], default))
    return make_dataclass(name, schema_fields, namespace={"__module__": module, "__doc__": doc})
