"""Typed job configuration: the one place that holds defaults.

Every job is `python -m pipelines.<job> --config PATH [key=value ...]`. The YAML file and the dotted
overrides are merged into one plain dict and validated into `Config`. Unknown keys and wrong types
are errors (`ConfigError`), each naming the key, never warnings.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayConfig(Section):
    address: str | None = Field(
        None,
        description="Ray cluster to join; None uses RAY_ADDRESS when set, else starts an embedded Ray.",
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs for an embedded Ray (None: all).")


class WorldConfig(Section):
    """The synthetic aesthetic world (align.world)."""

    seed: int = 0
    num_images: int = Field(6000, ge=1)
    image_size: int = Field(64, ge=16, le=512, description="Rendered side length in pixels.")
    shard_size: int = Field(1000, ge=1, description="Images per Parquet shard (one Ray task each).")
    caption_quality_share: float = Field(
        0.3, ge=0.0, le=1.0, description="Share of captions that carry truthful quality words."
    )
    heldout_query_share: float = Field(0.25, gt=0.0, lt=1.0)
    low_level_weight: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Weight of pixel-visible attributes in the true aesthetic; the rest is "
        "composition and colour harmony.",
    )
    jpeg_quality: int = Field(92, ge=50, le=100)


class ModelConfig(Section):
    """A CLIP model, built by align.models.build_clip."""

    name: str = Field("tiny-clip", description="open_clip model name (project configs included).")
    pretrained: str | None = Field(
        None, description="open_clip pretrained tag (e.g. 'openai') or a local checkpoint path."
    )
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"


class Config(Section):
    """Root config shared by every job; each job reads the sections it needs."""

    output_dir: str = Field("outputs/demo", description="Every job writes under this path or URI.")
    ray: RayConfig = RayConfig()
    world: WorldConfig = WorldConfig()
    model: ModelConfig = ModelConfig()

    def path(self, *parts: str) -> str:
        """A path under output_dir, joined with '/' so that URIs (s3://...) work too. A local
        path is made absolute here, in the driver, so Ray workers write to the same place."""
        root = self.output_dir if "://" in self.output_dir else os.path.abspath(self.output_dir)
        return "/".join([root.rstrip("/"), *parts])


# ---------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `a.b.c=value`; the value is read as YAML (so 3, 0.5, true, null, [1,2] work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. world.seed=3)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _section_at(path: list[str]) -> type[BaseModel] | None:
    """The model class of the section at a dotted path, or None when the path is not a section."""
    model: type[BaseModel] = Config
    for part in path:
        field = model.model_fields.get(part)
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return None
        model = field.annotation
    return model


def _unknown_key_message(path: list[str]) -> str:
    parent = _section_at(path[:-1])
    where = ".".join(path[:-1]) or "the top level"
    valid = ", ".join(parent.model_fields) if parent else "(not a section)"
    return f"unknown config key '{'.'.join(path)}'; valid keys under {where}: {valid}"


def _format_validation_error(err: ValidationError) -> str:
    problems = []
    for e in err.errors():
        path = [str(p) for p in e["loc"]]
        if e["type"] == "extra_forbidden":
            problems.append(_unknown_key_message(path))
        else:
            got = e.get("input")
            got_text = f" (got {got!r})" if not isinstance(got, dict) else ""
            problems.append(f"config key '{'.'.join(path)}': {e['msg'].lower()}{got_text}")
    return "; ".join(problems)


def _set_dotted(data: dict, path: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        if _section_at(path[: i + 1]) is None:
            raise ConfigError(_unknown_key_message(path[: i + 1]))
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{'.'.join(path[: i + 1])}' is a section, not a value")
        node = child
    node[path[-1]] = value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Load a YAML config, apply dotted overrides, validate.

    Args:
        path: YAML file; None gives the defaults.
        overrides: `key.sub=value` strings applied after the file, in order.
    Returns:
        The validated Config.
    Raises:
        ConfigError: missing or malformed file, unknown key, wrong type. One line, naming the key.
    """
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
    data = copy.deepcopy(data)
    for text in overrides:
        key_path, value = parse_override(text)
        _set_dotted(data, key_path, value)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None


def config_to_dict(config: Config) -> dict:
    """Plain JSON-able dict of a config (for manifests and Ray task arguments)."""
    return config.model_dump(mode="json")
