"""Python client for the vlm.v1 VisionLanguageService (sync and asyncio)."""

from vlm_client.client import AsyncVLMClient, GatewayUnreachable, VLMClient, build_request, response_format
from vlm_client.images import to_image, upright_box
from vlm_client.videos import to_video

__all__ = ["AsyncVLMClient", "GatewayUnreachable", "VLMClient", "build_request", "response_format", "to_image",
           "to_video", "upright_box"]
