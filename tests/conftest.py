"""Shared fixtures: the tiny checkpoints (built on first use) and test images."""

from __future__ import annotations

import http.server
import io
import os
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm_serving import tiny_checkpoints

REPO_ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("qwen2_5_vl", "pixtral")


@pytest.fixture(scope="session")
def checkpoints() -> Path:
    """build/models with one tiny checkpoint per family (what `make models` writes)."""
    directory = REPO_ROOT / "build" / "models"
    tiny_checkpoints.main([str(directory)])
    return directory


def require_tool(available: bool, reason: str) -> None:
    """Skip on a developer machine that lacks a tool; under CI (which installs it: `make setup`)
    a missing tool fails, so no test is counted as passing without having run."""
    if available:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must have it (make setup installs it)")
    pytest.skip(reason)


def picture(width: int, height: int, seed: int = 0, mode: str = "RGB", noise: int = 40) -> Image.Image:
    """A noisy picture with structure (gradients + noise), so resizing has real work to do."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    noisy = np.clip(base + rng.integers(-noise, noise + 1, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(noisy, "RGB")
    return image if mode == "RGB" else image.convert(mode)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def serving_file(body: bytes, delay_s: float = 0.0) -> type[http.server.BaseHTTPRequestHandler]:
    """A request handler that answers every GET with `body`, after `delay_s` seconds."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            threading.Event().wait(delay_s)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    return Handler


@contextmanager
def http_host(handler_class):
    """A loopback HTTP server with `handler_class`; yields its "127.0.0.1:port"."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
