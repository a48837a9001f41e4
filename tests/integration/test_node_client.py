"""The Node.js client (clients/node), generated from the same protos, against the running gateway."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.conftest import REPO_ROOT, encode, picture, require_tool
from tests.integration.conftest import KEY
from tests.unit.test_video import encode as encode_clip

pytestmark = pytest.mark.integration
NODE_DIR = REPO_ROOT / "clients" / "node"


def test_node_client_against_the_gateway(gateway, tmp_path):
    require_tool(shutil.which("node") is not None, "Node.js is not installed (the Node client needs it)")
    require_tool((NODE_DIR / "node_modules").is_dir(), "clients/node/node_modules missing: run `make setup`")
    image = tmp_path / "picture.png"
    image.write_bytes(encode(picture(100, 70, seed=4)))
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(encode_clip("h264", frames=32, rate=8, size=(96, 72)))
    env = dict(os.environ, VLM_GATEWAY_ADDRESS=gateway.address, VLM_API_KEY=KEY, VLM_TEST_IMAGE=str(image),
               VLM_TEST_VIDEO=str(clip))
    result = subprocess.run(["node", "--test", "test/e2e.test.js"], cwd=NODE_DIR, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# fail 0" in result.stdout and "# pass 8" in result.stdout, result.stdout
