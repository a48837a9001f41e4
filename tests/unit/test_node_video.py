"""The Node.js client's video parts (clients/node/test/video.test.js), sent to a stand-in gateway and
parsed here with the gateway's own vlm_pb2: what the service would receive."""

from __future__ import annotations

import os
import shutil
import subprocess

from vlm.v1 import vlm_pb2

from tests.conftest import REPO_ROOT, require_tool
from tests.unit.test_video import encode

NODE_DIR = REPO_ROOT / "clients" / "node"


def test_node_client_sends_videos_with_their_sampling(tmp_path):
    require_tool(shutil.which("node") is not None, "Node.js is not installed (the Node client needs it)")
    require_tool((NODE_DIR / "node_modules").is_dir(), "clients/node/node_modules missing: run `make setup`")
    clip, sent = tmp_path / "clip.mp4", tmp_path / "request.bin"
    clip.write_bytes(encode("h264", frames=20))
    env = dict(os.environ, VLM_TEST_VIDEO=str(clip), VLM_TEST_REQUEST_OUT=str(sent))
    result = subprocess.run(["node", "--test", "test/video.test.js"], cwd=NODE_DIR, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "# fail 0" in result.stdout and "# pass 2" in result.stdout, (
        result.stdout + result.stderr)
    request = vlm_pb2.GenerateRequest.FromString(sent.read_bytes())
    parts = request.messages[0].parts
    assert [part.WhichOneof("kind") for part in parts] == ["image", "video", "video", "video", "text"]
    assert (parts[1].video.data, parts[1].video.fps, parts[1].video.max_frames) == (clip.read_bytes(), 1.5, 8)
    assert (parts[2].video.url, parts[2].video.fps, parts[2].video.max_frames) == (
        "https://cdn.internal/clip.webm", 0, 0)
    assert parts[3].video.data == clip.read_bytes() and request.config.max_tokens == 8
