"""Helpers shared by integration tests (fixtures stay in conftest.py)."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port free on loopback now (for servers a test starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def indexed_world(root: Path, num_images: int, *extra: str) -> list[str]:
    """Make a small world under `root` and index it with a fixed micro-clip checkpoint (the
    reference model); returns the config overrides that reproduce it."""
    import torch

    from align.config import ModelConfig, load_config
    from align.models.clip import build_clip
    from pipelines.index_corpus import index_corpus
    from pipelines.make_world import make_world

    ckpt = root / "micro.pt"
    torch.save(build_clip(ModelConfig(name="micro-clip")).model.state_dict(), ckpt)
    overrides = [
        f"output_dir={root}",
        f"world.num_images={num_images}",
        f"world.shard_size={num_images // 2}",
        # The pretraining set (finetune_captions, less the unseen families) as large as the corpus: the
        # demo's 24,000 would take longer to render than a test world.
        f"world.pretrain_images={num_images}",
        f"world.eval_images={num_images // 2}",
        "model.name=micro-clip",
        f"model.pretrained={ckpt}",
        "index_corpus.index.recall_queries=20",
        *extra,
    ]
    config = load_config(REPO / "configs/demo.yaml", overrides)
    make_world(config)
    index_corpus(config)
    return overrides


def score_gallery(overrides: list[str]) -> None:
    """Score the world's evaluation gallery (index_corpus, embed step only) as the demo does:
    evaluate's aesthetic@k on it reads these scores."""
    from align.config import load_config
    from align.storage import paths
    from pipelines.index_corpus import index_corpus

    config = load_config(
        REPO / "configs/demo.yaml",
        [
            *overrides,
            f"index_corpus.input={paths.WORLD_EVAL_IMAGES}",
            f"index_corpus.output={paths.INDEX_CORPUS_EVAL}",
            "index_corpus.steps=[embed]",
        ],
    )
    index_corpus(config)


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


class HeadlessChromium:
    """A headless Chromium driven over the DevTools protocol (aiohttp websocket): navigate, run
    JavaScript, type, press keys, take screenshots, as a user's browser would.

        async with HeadlessChromium(tmp_path) as page:
            await page.navigate(url)
            await page.evaluate("document.title")
    """

    def __init__(self, profile_dir: Path):
        self.profile_dir = profile_dir
        self._next_id = 0

    async def __aenter__(self):
        import asyncio
        import shutil
        import subprocess

        import aiohttp

        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        assert binary, "chromium not found: `make test` installs it (apt-get install chromium)"
        port = free_port()
        self.process = subprocess.Popen(
            [
                binary, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,900",
                f"--remote-debugging-port={port}", f"--user-data-dir={self.profile_dir}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.session = aiohttp.ClientSession()
        for _ in range(100):
            try:
                async with self.session.get(f"http://127.0.0.1:{port}/json/list") as r:
                    pages = [t for t in await r.json() if t["type"] == "page"]
                if pages:
                    break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
        else:
            raise RuntimeError("chromium's DevTools endpoint did not come up")
        self.ws = await self.session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        return self

    async def __aexit__(self, *exc):
        await self.ws.close()
        await self.session.close()
        self.process.kill()
        self.process.wait()

    async def send(self, method: str, **params) -> dict:
        self._next_id += 1
        await self.ws.send_json({"id": self._next_id, "method": method, "params": params})
        while True:
            message = await self.ws.receive_json(timeout=60)
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    async def evaluate(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def navigate(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete'")

    async def wait_for(self, expression: str, timeout_s: float = 30.0) -> None:
        import asyncio
        import time

        deadline = time.monotonic() + timeout_s
        while not await self.evaluate(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(f"not true after {timeout_s} s: {expression}")
            await asyncio.sleep(0.1)

    async def type_text(self, text: str) -> None:
        await self.send("Input.insertText", text=text)

    async def press_enter(self) -> None:
        for kind in ("keyDown", "keyUp"):
            await self.send(
                "Input.dispatchKeyEvent",
                type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13, text="\r",
            )  # fmt: skip

    async def screenshot(self, path: Path) -> bytes:
        import base64

        data = base64.b64decode((await self.send("Page.captureScreenshot", format="png"))["data"])
        path.write_bytes(data)
        return data


class ScriptedEndpoint:
    """An OpenAI-compatible endpoint on loopback that answers each call from a script."""

    def __init__(self, answers: list[tuple[int, str, bytes]]):
        import http.server
        import threading

        self.answers, self.calls = list(answers), []
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                endpoint.calls.append(dict(self.headers))
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status, kind, body = endpoint.answers[
                    min(len(endpoint.calls), len(endpoint.answers)) - 1
                ]
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1/chat/completions"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()  # the port refuses from now on (a closed endpoint)


def scraped_metrics(prefix: str = "ray_aesthetic_align_") -> list:
    """The project's samples on this node's Prometheus endpoint (Ray's metrics agent), now."""
    import urllib.request

    import ray
    from prometheus_client.parser import text_string_to_metric_families

    port = ray._private.worker.global_worker.node.metrics_export_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    families = text_string_to_metric_families(text)
    return [s for f in families for s in f.samples if s.name.startswith(prefix)]


def metric_total(samples: list, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (over replicas and workers)."""
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def wait_for_metrics(condition, timeout_s: float = 30.0) -> list:
    """Scrape until `condition(samples)` holds (Ray's agent reports every few seconds)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        samples = scraped_metrics()
        if condition(samples):
            return samples
        if time.monotonic() > deadline:
            names = sorted({s.name for s in samples})
            raise AssertionError(f"metrics not there after {timeout_s} s; scraped: {names}")
        time.sleep(0.5)
