"""The Node.js client (clients/node), generated from the same protos, against the running gateway."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.conftest import REPO_ROOT, encode, picture
from tests.integration.conftest import KEY

pytestmark = pytest.mark.integration
NODE_DIR = REPO_ROOT / "clients" / "node"


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed (the Node client needs it)")
@pytest.mark.skipif(not (NODE_DIR / "node_modules").is_dir(), reason="clients/node/node_modules missing: run `make setup`")
def test_node_client_against_the_gateway(gateway, tmp_path):
    image = tmp_path / "picture.png"
    image.write_bytes(encode(picture(100, 70, seed=4)))
    env = dict(os.environ, VLM_GATEWAY_ADDRESS=gateway.address, VLM_API_KEY=KEY, VLM_TEST_IMAGE=str(image))
    result = subprocess.run(["node", "--test", "test/"], cwd=NODE_DIR, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# fail 0" in result.stdout and "# pass 5" in result.stdout, result.stdout
