"""The search application's settings (the `args` of configs/serve.yaml) and what they resolve to.

A served model is named by the jobs' outputs, not by weights paths typed twice: `index_corpus` is
an index_corpus output folder, whose manifest names the CLIP model that embedded the corpus (the
one that must embed the queries) and the corpus the images come from; `run`, when given, is the
finetune or pretrain run the model should come from, and the app refuses to start when the index
was built with another model.

Per-deployment resources (autoscaling_config, ray_actor_options, max_ongoing_requests) are not
here: they are the `deployments:` entries of the Serve config file, which Serve applies itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field, ValidationError, model_validator

from align.config import ModelConfig, RerankConfig, RewriteConfig, Section
from align.errors import UserError
from align.runtime.manifest import MANIFEST_NAME
from align.search.stored import check_index, read_index_manifest, shares_image_tower
from align.storage import io


class ServeConfigError(UserError, ValueError):
    """Serve args that cannot be used; the message names the key or the file."""


class ServedModelConfig(Section):
    index_corpus: str = Field(
        description="index_corpus output folder: its index, and the model that embedded the corpus."
    )
    run: str | None = Field(
        None,
        description="finetune or pretrain output folder whose exported model.pt is served; the "
        "index must have been built with it or with a model of the same image tower (a fine-tune "
        "with finetune.lock_image over its base's index). None: serve whatever model built the "
        "index.",
    )
    label: str | None = Field(None, description="Name shown on the search page.")


class BatchingConfig(Section):
    """@serve.batch settings of a deployment."""

    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.002, ge=0.0)


class RewriterConfig(Section):
    """The optional query rewriter: keywords (no model) or an OpenAI-compatible endpoint."""

    method: RewriteConfig = RewriteConfig(backend="keywords", variant="k_phrase")
    timeout_s: float = Field(
        10.0,
        gt=0.0,
        description="The whole endpoint call, every retry and backoff included; then the query "
        "as is. Must leave the search time under the proxy's request timeout "
        "(request_timeout_s).",
    )
    retry_wait_s: float = Field(
        0.2,
        ge=0.0,
        description="First retry's wait; doubling, with jitter (method.http.max_retries).",
    )
    cache_size: int = Field(10_000, ge=0, description="Rewrites kept per replica (LRU).")
    breaker_failures: int = Field(
        5,
        ge=1,
        description="Consecutive failed calls after which a replica stops calling the endpoint "
        "(circuit breaker open: the query as is at once) for breaker_cooldown_s.",
    )
    breaker_cooldown_s: float = Field(
        30.0,
        gt=0.0,
        description="How long the breaker stays open; then one trial call goes through, and "
        "its success closes the breaker, its failure opens it again.",
    )

    @model_validator(mode="after")
    def _online_backend(self):
        if self.method.backend == "vllm":
            raise ValueError(
                "rewriter.method.backend 'vllm' is the batch engine; to serve, run the model "
                "behind vLLM's OpenAI-compatible server and use backend 'http'"
            )
        return self


class FiltersConfig(Section):
    """The result filters of /search (`dedup`, `min_aesthetic`) and clip-back's `deduplicate`:
    the search goes deeper (4x each time) until k results pass, up to max_depth candidates."""

    dedup_threshold: float = Field(
        0.94, gt=0.0, le=1.0, description="Cosine at or above which results are duplicates."
    )
    max_depth: int = Field(
        2000,
        ge=1,
        description="Most candidates one filtered search looks at (dedup compares them all "
        "pairwise: max_depth^2 similarities).",
    )


class ServeArgs(Section):
    models: dict[str, ServedModelConfig] = Field(min_length=1)
    default_model: str | None = Field(None, description="None: the first model.")
    rewriter: RewriterConfig | None = RewriterConfig()
    rerank: RerankConfig = RerankConfig()
    filters: FiltersConfig = FiltersConfig()
    default_k: int = Field(10, ge=1)
    max_k: int = Field(100, ge=1)
    max_query_chars: int = Field(1000, ge=1)
    text_batching: BatchingConfig = BatchingConfig()
    index_batching: BatchingConfig = BatchingConfig()
    encoder_threads: int | None = Field(1, ge=1, description="Torch threads per text encoder.")
    api_key_env: str | None = Field(
        None,
        description="Environment variable holding the API key; when set, /search, /images and "
        "clip-back's routes need it in the X-API-Key header. The variable must be set on the "
        "serving nodes.",
    )
    image_url_template: str | None = Field(
        None,
        description="Image URLs in results, e.g. 'https://cdn.example.com/{image_id}' for corpora "
        "served from object storage; None: this app's /images/{image_id}.",
    )
    max_body_bytes: int = Field(
        64 * 1024, ge=1024, description="Request bodies over this many bytes get 413."
    )
    max_image_body_bytes: int = Field(
        4 * 2**20,
        ge=1024,
        description="The same limit for bodies that may hold a query image: POST /search and "
        "clip-back's /knn-service.",
    )
    max_query_image_pixels: int = Field(
        4096**2,
        ge=1,
        description="Most pixels a query image may have, read from its header before it is "
        "decoded (a 250 KB PNG can declare 62 megapixels: 190 MB and seconds of CPU); queries "
        "are reduced to the model's size, so a larger one would add nothing.",
    )
    query_image_decoders: int = Field(
        2,
        ge=1,
        description="Query images decoded at once per ingress replica, on threads of its own "
        "(the event loop answers other requests meanwhile); more wait their turn.",
    )
    cors_origins: list[str] = Field(
        [],
        description="Origins (scheme://host[:port]) whose pages may call clip-back's routes "
        "(/knn-service, /metadata, /indices-list) from the browser; '*': any (clip-back's own "
        "answer, for a drop-in). Empty: no cross-origin access.",
    )
    request_timeout_s: float | None = Field(
        None,
        gt=0.0,
        description="The proxy's http_options.request_timeout_s, repeated here because Serve "
        "gives an app's builder only its args: rewriter.timeout_s is checked against it. "
        "None: not checked.",
    )
    allowed_hosts: list[str] | None = Field(
        None,
        description="Host header names the app answers (DNS-rebinding guard); '*' allows any. "
        "None: the loopback names when no API key is set (a keyless server is for this machine), "
        "any host when one is.",
    )

    @model_validator(mode="after")
    def _consistent(self):
        if self.default_model is not None and self.default_model not in self.models:
            raise ValueError(
                f"default_model {self.default_model!r} is not one of the models "
                f"({', '.join(self.models)})"
            )
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) is over max_k ({self.max_k})")
        if self.rerank.depth < self.max_k:
            raise ValueError(f"rerank.depth ({self.rerank.depth}) is under max_k ({self.max_k})")
        if self.filters.max_depth < self.rerank.depth:
            raise ValueError(
                f"filters.max_depth ({self.filters.max_depth}) is under rerank.depth "
                f"({self.rerank.depth})"
            )
        if self.image_url_template is not None and "{image_id}" not in self.image_url_template:
            raise ValueError("image_url_template needs an {image_id} slot")
        for origin in self.cors_origins:
            scheme, _, host = origin.partition("://")
            if origin != "*" and (scheme not in ("http", "https") or not host or "/" in host):
                raise ValueError(
                    f"cors_origins: {origin!r} is not an origin (scheme://host[:port], no path) "
                    "or '*'"
                )
        rewriter, limit = self.rewriter, self.request_timeout_s
        # The rewrite comes before the search, in the same request: a rewriter that may take
        # more than half the proxy's timeout would turn an LLM outage into 408s instead of the
        # query as is.
        if rewriter and rewriter.method.backend == "http" and limit is not None:
            if rewriter.timeout_s > limit / 2:
                raise ValueError(
                    f"rewriter.timeout_s ({rewriter.timeout_s:g}) is over half of "
                    f"request_timeout_s ({limit:g}): the search after a slow rewrite would time "
                    "out instead of falling back to the query as is"
                )
        return self

    @property
    def first_model(self) -> str:
        return self.default_model or next(iter(self.models))


def parse_args(args: dict) -> ServeArgs:
    """Validate the app's args. Raises ServeConfigError naming each bad key."""
    try:
        return ServeArgs.model_validate(args or {})
    except ValidationError as err:
        problems = []
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"]) or "args"
            problems.append(f"serve args '{where}': {e['msg'].removeprefix('Value error, ')}")
        raise ServeConfigError("; ".join(problems)) from None


@dataclass(frozen=True)
class ServedModel:
    """A model as served: the CLIP config that embeds queries, its index, its image corpus."""

    name: str
    label: str
    model: dict  # ModelConfig fields
    index_dir: str
    corpus: dict  # input, input_format, id_column, image_column, path_column


def _read_manifest(folder: str, what: str, jobs: tuple[str, ...]) -> dict:
    path = f"{folder}/{MANIFEST_NAME}"
    if not io.exists(path):
        raise ServeConfigError(f"{what}: no {MANIFEST_NAME} in {folder}; has that job finished?")
    manifest = io.read_json(path)
    if manifest.get("job") not in jobs:
        raise ServeConfigError(
            f"{what}: {folder} is the output of {manifest.get('job')!r}, not of {' or '.join(jobs)}"
        )
    return manifest


def _run_model(what: str, indexed: ModelConfig, run_dir: str, ic_dir: str) -> ModelConfig:
    """The model a training run exported, for an index built with `indexed`: that model, or
    one whose image tower is the indexed model's (a fine-tune with finetune.lock_image), which
    then embeds the queries while the index stays as it is."""

    run = _read_manifest(run_dir, f"{what} run", ("finetune", "pretrain"))
    if indexed.pretrained == run["export"]:
        return indexed
    exported = indexed.model_copy(update={"pretrained": run["export"]})
    try:
        index_manifest = read_index_manifest(f"{ic_dir}/index")
    except UserError as e:
        raise ServeConfigError(f"{what}: {e}") from None
    why = "the two image towers differ"
    if index_manifest.get("image_tower") is None:
        why = (
            "its _index.json records no image tower to compare; index_corpus.steps=[index] adds it"
        )
    try:
        if shares_image_tower(exported, index_manifest):
            return exported
    except UserError as e:  # the run's checkpoint is gone or unreadable
        why = str(e)
    raise ServeConfigError(
        f"{what}: the index in {ic_dir} was built with model.pretrained={indexed.pretrained}, "
        f"not with the run's {run['export']} ({why}); index the corpus with "
        f"model.pretrained={run['export']}"
    )


def resolve_models(args: ServeArgs) -> dict[str, ServedModel]:
    """Each configured model from the manifests of the jobs that made it; checked before serving.

    Raises:
        ServeConfigError: a folder without a finished job's manifest, an index built with another
            model than the named run's (and another image tower), or a model that cannot be
            built (missing checkpoint).
    """

    served = {}
    for name, m in args.models.items():
        what = f"model {name!r}"
        ic_dir = io.absolute(m.index_corpus)
        manifest = _read_manifest(ic_dir, f"{what} index_corpus", ("index_corpus",))
        model = ModelConfig.model_validate(manifest["config"]["model"])
        if m.run is not None:
            model = _run_model(what, model, io.absolute(m.run), ic_dir)
        try:  # the index exists, was built with these weights, and has per-shard files
            check_index(model, ic_dir)
        except UserError as e:
            raise ServeConfigError(f"{what}: {e}") from None
        ic = manifest["config"]["index_corpus"]
        served[name] = ServedModel(
            name=name,
            label=m.label or name,
            model=model.model_dump(),
            index_dir=f"{ic_dir}/index",
            corpus={
                "input": manifest["input"],
                "input_format": ic["input_format"],
                "id_column": ic["id_column"],
                "image_column": ic["image_column"],
                "path_column": ic["path_column"],
            },
        )
    return served
