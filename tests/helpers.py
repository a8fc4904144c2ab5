"""Helpers shared by integration tests (fixtures stay in conftest.py)."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def indexed_world(root: Path, num_images: int, *extra: str) -> list[str]:
    """Make a small world under `root` and index it with a fixed micro-clip checkpoint (the
    reference model); returns the config overrides that reproduce it."""
    import torch

    from align.config import ModelConfig, load_config
    from align.models import build_clip
    from pipelines.index_corpus import index_corpus
    from pipelines.make_world import make_world

    ckpt = root / "micro.pt"
    torch.save(build_clip(ModelConfig(name="micro-clip")).model.state_dict(), ckpt)
    overrides = [
        f"output_dir={root}",
        f"world.num_images={num_images}",
        f"world.shard_size={num_images // 2}",
        "model.name=micro-clip",
        f"model.pretrained={ckpt}",
        "index_corpus.index.recall_queries=20",
        *extra,
    ]
    config = load_config(REPO / "configs/demo.yaml", overrides)
    make_world(config)
    index_corpus(config)
    return overrides


class JsonHandler(BaseHTTPRequestHandler):
    """Base of the tests' OpenAI-compatible endpoints: a JSON request in, a JSON reply out."""

    def read_json(self) -> dict:
        return json.loads(self.rfile.read(int(self.headers["Content-Length"])))

    def reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass
