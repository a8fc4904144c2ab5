"""Typed job configuration: the one place that holds defaults.

The sections live one group to a module (`sections`: the shared building blocks; `world`,
`index_corpus`, `build_preferences`, `training`, `evaluate`: each job's); this module holds the
root `Config` and loading, and exports every section, so `from align.config import IndexConfig`
reads the same wherever a section lives.

Every job is `python -m pipelines.<job> --config PATH [key=value ...]`. The YAML file and the dotted
overrides are merged into one plain dict and validated into `Config`. Unknown keys and wrong types
are errors (`ConfigError`), each naming the key, never warnings. May import `storage` and
`method` (the prompts' defaults, the grid's rule).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from align.config.build_preferences import (
    RETRIEVE_WITH,
    BuildPreferencesConfig,
    GridConfig,
    HttpRewriteConfig,
    RewriteConfig,
    VllmRewriteConfig,
)
from align.config.evaluate import (
    EvalSystemConfig,
    EvaluateConfig,
    HttpJudgeConfig,
    JudgeConfig,
    RerankConfig,
    SteerConfig,
    VllmJudgeConfig,
)
from align.config.index_corpus import IndexCorpusConfig
from align.config.sections import (
    ConfigError,
    IndexConfig,
    ModelConfig,
    PoolConfig,
    RayConfig,
    ScorerConfig,
    Section,
)
from align.config.training import (
    PRETRAIN_DEFAULTS,
    DeepSpeedConfig,
    DpoConfig,
    FinetuneConfig,
    JoinConfig,
    OptimConfig,
    TrainScalingConfig,
    TrainScorerConfig,
)
from align.config.world import WorldConfig
from align.storage import io

__all__ = [
    "Section",
    "ConfigError",
    "RayConfig",
    "ModelConfig",
    "PoolConfig",
    "ScorerConfig",
    "IndexConfig",
    "WorldConfig",
    "IndexCorpusConfig",
    "HttpRewriteConfig",
    "VllmRewriteConfig",
    "RewriteConfig",
    "GridConfig",
    "RETRIEVE_WITH",
    "BuildPreferencesConfig",
    "DpoConfig",
    "OptimConfig",
    "DeepSpeedConfig",
    "TrainScalingConfig",
    "JoinConfig",
    "FinetuneConfig",
    "TrainScorerConfig",
    "PRETRAIN_DEFAULTS",
    "RerankConfig",
    "SteerConfig",
    "EvalSystemConfig",
    "HttpJudgeConfig",
    "VllmJudgeConfig",
    "JudgeConfig",
    "EvaluateConfig",
    "Config",
    "load_config",
    "config_to_dict",
    "parse_override",
]


class Config(Section):
    """Root config shared by every job; each job reads the sections it needs."""

    output_dir: str = Field("outputs/demo", description="Every job writes under this path or URI.")
    max_image_pixels: int = Field(
        64_000_000,
        ge=1,
        description="Decompression-bomb guard of every decoder (index_corpus, train_scorer, "
        "finetune, evaluate and its report): larger images are error rows.",
    )
    ray: RayConfig = RayConfig()
    world: WorldConfig = WorldConfig()
    model: ModelConfig = ModelConfig()
    index_corpus: IndexCorpusConfig = IndexCorpusConfig()
    build_preferences: BuildPreferencesConfig = BuildPreferencesConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    train_scorer: TrainScorerConfig = TrainScorerConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    pretrain: FinetuneConfig = Field(
        default_factory=lambda: FinetuneConfig(**PRETRAIN_DEFAULTS),
        description="The pretrain job (and the demo's first training step): CLIP InfoNCE on "
        "image-caption pairs from model.pretrained (None: random init); same keys as finetune.",
    )

    @model_validator(mode="before")
    @classmethod
    def _pretrain_section_defaults(cls, data):
        # A `pretrain:` section in a file replaces the default section whole, and its keys would
        # otherwise default to the finetune job's: it would write into finetune's output.
        if isinstance(data, dict) and isinstance(data.get("pretrain"), dict):
            data = {**data, "pretrain": {**PRETRAIN_DEFAULTS, **data["pretrain"]}}
        return data

    @model_validator(mode="after")
    def _pretrain_is_contrastive(self):
        if self.pretrain.objective != "contrastive":
            raise ValueError("pretrain.objective must be 'contrastive' (dpo is the finetune job)")
        return self

    @model_validator(mode="after")
    def _expand_model_path(self):
        # A checkpoint may live under output_dir (the demo's pretrained base model, its scorer).
        pretrained = self.model.pretrained
        if pretrained and "{output_dir}" in pretrained:
            self.model.pretrained = self.expand(pretrained)
        for scorer in self.index_corpus.scorers.values():
            if scorer.checkpoint and "{output_dir}" in scorer.checkpoint:
                scorer.checkpoint = self.expand(scorer.checkpoint)
        return self

    def for_other_processes(self) -> Config:
        """This config with every local path that names a file absolute, resolved here in the
        driver: output_dir and a local model checkpoint. For processes whose working directory
        differs: Ray Train moves each worker into its run folder (`os.chdir`), where a relative
        `outputs/demo` would name another place."""
        pretrained = self.model.pretrained
        if pretrained and not io.is_uri(pretrained) and os.path.exists(pretrained):
            pretrained = os.path.abspath(pretrained)  # a checkpoint file, not an open_clip tag
        return self.model_copy(
            update={
                "output_dir": io.absolute(self.output_dir),
                "model": self.model.model_copy(update={"pretrained": pretrained}),
            }
        )

    def expand(self, path: str) -> str:
        """Expand `{output_dir}` in a configured path; local paths become absolute."""
        path = path.replace("{output_dir}", self.output_dir.rstrip("/"))
        return io.absolute(path)

    def job_output(self, section: str) -> str:
        """Where the job of a config section writes (`<section>.output`, expanded): world,
        train_scorer, index_corpus, build_preferences, finetune, pretrain or evaluate."""
        return self.expand(getattr(self, section).output).rstrip("/")


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


def _model_class(annotation: Any) -> type[BaseModel] | None:
    """The section class of a field's annotation; an optional section (`Section | None`, such as
    a system's `rerank`) counts as that section, so dotted overrides reach inside it."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    members = [a for a in get_args(annotation) if a is not type(None)]
    if len(members) == 1 and get_args(annotation) and type(None) in get_args(annotation):
        return _model_class(members[0])
    return None


def _node_at(path: list[str]) -> tuple[str, type[BaseModel]] | None:
    """What sits at a dotted path: ("section", cls), ("mapping", value cls) for a
    `dict[str, Section]` field such as index_corpus.scorers (any key, Section values), or None
    when the path names a plain value or nothing."""
    node: tuple[str, type[BaseModel]] | None = ("section", Config)
    for part in path:
        if node is None:
            return None
        kind, cls = node
        if kind == "mapping":
            node = ("section", cls)
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return None
        if get_origin(field.annotation) is dict:
            value_cls = _model_class(get_args(field.annotation)[1])
            node = ("mapping", value_cls) if value_cls else None
        else:
            sub = _model_class(field.annotation)
            node = ("section", sub) if sub else None
    return node


def _unknown_key_message(path: list[str]) -> str:
    parent = _node_at(path[:-1])
    where = ".".join(path[:-1]) or "the top level"
    valid = ", ".join(parent[1].model_fields) if parent and parent[0] == "section" else "(none)"
    return f"unknown config key '{'.'.join(path)}'; valid keys under {where}: {valid}"


def _format_validation_error(err: ValidationError) -> str:
    problems = []
    for e in err.errors():
        path = [str(p) for p in e["loc"]]
        if e["type"] == "extra_forbidden":
            problems.append(_unknown_key_message(path))
        elif not path:  # a check across sections; its message names the keys
            problems.append(e["msg"].removeprefix("Value error, "))
        elif e["type"] == "value_error" and isinstance(e.get("input"), dict):
            # A check across one section's keys: its message names them, relative to the section.
            problems.append(
                f"config section '{'.'.join(path)}': {e['msg'].removeprefix('Value error, ')}"
            )
        else:
            got = e.get("input")
            got_text = f" (got {got!r})" if not isinstance(got, dict) else ""
            problems.append(f"config key '{'.'.join(path)}': {e['msg'].lower()}{got_text}")
    return "; ".join(problems)


def _set_dotted(data: dict, path: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        if _node_at(path[: i + 1]) is None:
            parent = _node_at(path[:i])
            if parent and parent[0] == "section" and part in parent[1].model_fields:
                raise ConfigError(
                    f"config key '{'.'.join(path[: i + 1])}' is a value, not a section"
                )
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
