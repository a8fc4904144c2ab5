"""The systems an evaluation compares: a model (base or aligned), with or without query
rewriting, and the query-time baselines (re-rank, steer: align/method/ranking.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from align.config import ConfigError, EvaluateConfig, ModelConfig, RerankConfig, SteerConfig
from align.log import get_logger
from align.models.clip import check_model
from align.search.stored import check_layout, read_index_manifest

log = get_logger(__name__)


@dataclass(frozen=True)
class System:
    name: str
    model: ModelConfig
    rewrite: bool
    index_corpus_dir: str | None
    rerank: RerankConfig | None = None
    steer: SteerConfig | None = None

    @property
    def model_key(self) -> tuple:
        """Systems that share this key share their embeddings: one pass per distinct model."""
        return (self.model.name, self.model.pretrained, self.index_corpus_dir)


def resolve_systems(
    ev: EvaluateConfig, default_model: ModelConfig, expand: Callable[[str], str]
) -> list[System]:
    """The configured systems with defaults filled in from `default_model` (the config's
    `model`) and their paths expanded; each model checked (cheaply) before any work, so a
    missing checkpoint fails at once and names the system."""
    systems = []
    if not ev.systems:
        raise ConfigError("evaluate.systems is empty: name at least one system")
    for name, s in ev.systems.items():
        pretrained = s.pretrained if s.pretrained is not None else default_model.pretrained
        if pretrained and "{output_dir}" in pretrained:
            pretrained = expand(pretrained)
        model = default_model.model_copy(
            update={"name": s.model or default_model.name, "pretrained": pretrained}
        )
        try:
            check_model(model)
        except Exception as e:
            raise type(e)(f"system {name!r}: {e}") from None
        index_dir = expand(s.index_corpus_dir) if s.index_corpus_dir else None
        if index_dir:  # searched through align.search.corpus: its per-shard files must be there
            check_layout(f"{index_dir}/index", read_index_manifest(f"{index_dir}/index"))
        systems.append(System(name, model, s.rewrite, index_dir, s.rerank, s.steer))
    return systems


def judged_comparisons(ev: EvaluateConfig, systems: list[System]) -> list[tuple[str, str]]:
    """The (A, B) judge comparisons whose systems are both configured; the others are skipped
    with a warning."""
    names = {s.name for s in systems}
    comparisons = [(a, b) for a, b in ev.judge.compare if a in names and b in names]
    for a, b in ev.judge.compare:
        if (a, b) not in comparisons:
            log.warning("judge: skipping %s vs %s (not both in evaluate.systems)", a, b)
    return comparisons
