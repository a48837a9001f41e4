"""The Node.js client (clients/node), generated from the same protos, against the running gateway."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.conftest import REPO_ROOT, encode, picture, require_tool
from tests.integration.conftest import KEY

pytestmark = pytest.mark.integration
NODE_DIR = REPO_ROOT / "clients" / "node"


def test_node_client_against_the_gateway(gateway, tmp_path):
    require_tool(shutil.which("node") is not None, "Node.js is not installed (the Node client needs it)")
    require_tool((NODE_DIR / "node_modules").is_dir(), "clients/node/node_modules missing: run `make setup`")
    image = tmp_path / "picture.png"
    image.write_bytes(encode(picture(100, 70, seed=4)))
    env = dict(os.environ, VLM_GATEWAY_ADDRESS=gateway.address, VLM_API_KEY=KEY, VLM_TEST_IMAGE=str(image))
    result = subprocess.run(["node", "--test", "test/e2e.test.js"], cwd=NODE_DIR, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# fail 0" in result.stdout and "# pass 6" in result.stdout, result.stdout
