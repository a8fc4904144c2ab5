"""The search application: `build_app` is the builder Serve calls with a config file's `args`.

    serve run configs/serve.yaml                (a laptop: starts Ray, deploys, blocks)
    serve deploy configs/serve.yaml             (a running cluster, through its dashboard)

`deploy` does what `serve run CONFIG` does from Python, for tests and benchmarks: validate the
Serve config, start Serve's HTTP proxy, deploy the applications, wait until they run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray
import yaml
from ray import serve
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from align.config import ModelConfig
from align.models.clip import check_model
from serve.config import ServeConfigError, parse_args, resolve_models
from serve.deployments import ImageStore, QueryRewriter, TextEncoder, VectorIndex
from serve.ingress import SearchIngress


def model_facts(model: dict) -> dict:
    facts = check_model(ModelConfig.model_validate(model))
    return {"image_size": facts.image_size, "dim": facts.embed_dim}


def build_app(args: dict) -> Application:
    """The search app from its args (serve.config.ServeArgs).

    Raises:
        ServeConfigError: bad args, or job outputs that are missing or do not fit together; all
            checked here, before any replica starts.
    """
    cfg = parse_args(args)
    models = resolve_models(cfg)
    encoder = TextEncoder.bind(
        {n: m.model for n, m in models.items()}, cfg.encoder_threads, cfg.text_batching.model_dump()
    )
    index = VectorIndex.bind(
        {n: m.index_dir for n, m in models.items()},
        cfg.index_batching.model_dump(),
        cfg.filters.model_dump(),
    )
    images = ImageStore.bind({n: (m.corpus, m.index_dir) for n, m in models.items()})
    rewriter = QueryRewriter.bind(cfg.rewriter.model_dump()) if cfg.rewriter else None
    settings = {
        "models": {n: m.label for n, m in models.items()},
        "default_model": cfg.first_model,
        "default_k": cfg.default_k,
        "max_k": cfg.max_k,
        "max_query_chars": cfg.max_query_chars,
        "rerank_weight": cfg.rerank.weight,
        "rerank_depth": cfg.rerank.depth,
        "api_key_env": cfg.api_key_env,
        "image_url_template": cfg.image_url_template,
        "max_body_bytes": cfg.max_body_bytes,
        "allowed_hosts": cfg.allowed_hosts,
        "max_image_body_bytes": cfg.max_image_body_bytes,
        "filters": cfg.filters.model_dump(),
        "max_query_image_pixels": cfg.max_query_image_pixels,
        "query_image_decoders": cfg.query_image_decoders,
        "cors_origins": cfg.cors_origins,
        # Per model, what an image or embedding query must match.
        "model_facts": {n: model_facts(m.model) for n, m in models.items()},
    }
    return SearchIngress.bind(encoder, index, images, rewriter, settings)


def check_request_timeouts(config: dict) -> None:
    """Each search application's `request_timeout_s` arg, where given, is the config's
    http_options.request_timeout_s. Serve hands `build_app` only the args, so the arg is how the
    rewriter's deadline is checked against the proxy's timeout when the app starts, under
    `serve run` too (configs/serve.yaml sets both from one YAML anchor); this check catches the
    two drifting apart in a config read or deployed from Python.

    Raises:
        ServeConfigError: naming the application and both values.
    """
    proxy = (config.get("http_options") or {}).get("request_timeout_s")
    for app in config.get("applications", []):
        given = (app.get("args") or {}).get("request_timeout_s")
        if app.get("import_path") == "serve.app:build_app" and given is not None:
            if given != proxy:
                raise ServeConfigError(
                    f"application {app.get('name')!r}: args.request_timeout_s ({given}) is not "
                    f"http_options.request_timeout_s ({proxy})"
                )


def load_serve_config(path: str) -> dict:
    """A Serve config file (YAML), checked against Serve's schema and check_request_timeouts."""

    with open(path) as f:
        config = yaml.safe_load(f)
    ServeDeploySchema.model_validate(config)
    check_request_timeouts(config)
    return config


def deploy(config: dict, host: str | None = None, port: int | None = None, timeout_s=300) -> str:
    """Deploy a Serve config on the connected Ray cluster with Serve's own command line (`serve
    run --non-blocking CONFIG` against this cluster: public API only, Serve applies the
    deployments' options itself); returns the HTTP base URL once every application is RUNNING.

    Raises:
        ServeConfigError: an application's args.request_timeout_s is not the proxy's.
        RuntimeError: `serve run` refused the config, an application failed to deploy (the
            message is Serve's, e.g. a ServeConfigError from `build_app`), or it was not running
            within timeout_s.
    """

    schema = ServeDeploySchema.model_validate(config)  # a malformed config fails here, clearly
    check_request_timeouts(config)
    http = schema.http_options.model_dump(exclude_unset=True)
    http.update({k: v for k, v in (("host", host), ("port", port)) if v is not None})
    config = {**config, "http_options": http}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="serve-") as f:
        json.dump(config, f)  # JSON is YAML
        f.flush()
        command = [
            str(Path(sys.executable).with_name("serve")),
            "run",
            "--non-blocking",
            "--address",
            ray.get_runtime_context().gcs_address,
            f.name,
        ]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"serve run failed: {(proc.stderr or proc.stdout)[-2000:]}")
    names = [app.name for app in schema.applications]
    deadline = time.monotonic() + timeout_s
    while True:
        apps = serve.status().applications
        states = {n: apps[n].status if n in apps else "NOT_STARTED" for n in names}
        failed = [n for n, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")]
        if failed:
            raise RuntimeError(f"application {failed[0]} failed: {apps[failed[0]].message}")
        if all(s == "RUNNING" for s in states.values()):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"applications not running after {timeout_s} s: {states}")
        time.sleep(0.5)
    return f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}"
