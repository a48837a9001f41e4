"""The Node.js client's TLS options (clients/node/test/tls.test.js) against a stand-in gateway serving
mutual TLS, with certificates made here."""

from __future__ import annotations

import os
import shutil
import subprocess

from tests.certificates import Authority
from tests.conftest import REPO_ROOT, require_tool

NODE_DIR = REPO_ROOT / "clients" / "node"


def test_node_client_takes_an_authority_and_a_client_certificate(tmp_path):
    require_tool(shutil.which("node") is not None, "Node.js is not installed (the Node client needs it)")
    require_tool((NODE_DIR / "node_modules").is_dir(), "clients/node/node_modules missing: run `make setup`")
    Authority("ca", tmp_path).issue("gateway", tmp_path / "server.pem", tmp_path / "server.key")
    Authority("client-ca", tmp_path).issue("client", tmp_path / "client.pem", tmp_path / "client.key")
    Authority("stranger", tmp_path)
    result = subprocess.run(["node", "--test", "test/tls.test.js"], cwd=NODE_DIR, capture_output=True, text=True,
                            env=dict(os.environ, VLM_TEST_TLS_DIR=str(tmp_path)), timeout=120)
    assert result.returncode == 0 and "# fail 0" in result.stdout and "# pass 2" in result.stdout, (
        result.stdout + result.stderr)
