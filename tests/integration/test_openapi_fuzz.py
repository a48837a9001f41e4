"""Schemathesis against the real stack's OpenAPI description, as vLLM fuzzes its OpenAI server in CI:
generated requests (valid and invalid by the schema) to every route, checking that no request makes
a server error, that every response has a documented status, content type and body, that requests
the schema forbids are refused, and that the API key is never ignored."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.conftest import REPO_ROOT, require_tool
from tests.integration.conftest import KEY, start_gateway

pytestmark = pytest.mark.integration
SCHEMATHESIS = REPO_ROOT / "build" / "schemathesis" / "bin" / "schemathesis"
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "negative_data_rejection", "ignored_auth")


def test_schemathesis_finds_nothing_against_the_real_stack(triton, tmp_path):
    require_tool(SCHEMATHESIS.is_file(), "schemathesis is not installed (make setup installs it into build/schemathesis)")
    # Generation kept short (a few tokens each): the fuzzing is about the API, not the model.
    gateway = start_gateway(triton.grpc_url, tmp_path, VLM_MAX_TOKENS_LIMIT="8", VLM_DEFAULT_MAX_TOKENS="4",
                            VLM_DEFAULT_TIMEOUT_S="30")
    try:
        run = subprocess.run(
            [str(SCHEMATHESIS), "run", f"http://{gateway.http_address}/openapi.json", "-H", f"Authorization: Bearer {KEY}",
             "--checks", ",".join(CHECKS), "--max-time", "120", "--workers", "2", "--seed", "23",
             "--request-timeout", "60"],
            capture_output=True, text=True, timeout=400, cwd=tmp_path)
    finally:
        gateway.stop()
    summary = run.stdout[-6000:]
    assert run.returncode == 0, summary + run.stderr[-2000:]
    # Warnings are information (e.g. most generated bodies are refused: random text is rarely a valid
    # conversation), except those about the description itself.
    assert not re.search(r"unresolvable|\$ref|reference", summary, re.I), summary
    cases = re.search(r"(\d+) generated, (\d+) passed", summary)
    assert cases and int(cases.group(1)) > 1000 and cases.group(1) == cases.group(2), summary
    print(summary)  # the case count and the time, for the notes (pytest -s)
