"""Turn what callers have (paths, bytes, URLs) into `vlm.v1.Video` messages, with the rate and the
number of frames the service samples them at."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlm.v1 import vlm_pb2


def to_video(source: Any, fps: float = 0.0, max_frames: int = 0) -> vlm_pb2.Video:
    """A Video from a path, the file's bytes or an http(s) URL (a Video message is sent as it is).
    `fps`: frames to sample per second; `max_frames`: the most frames; unset (0): the service's
    defaults, 2 and 32. A file's first bytes must be an MP4, a WebM or a GIF, as the service's first
    check asks: a wrong file is refused here, before it is uploaded (ValueError naming it)."""
    if isinstance(source, vlm_pb2.Video):
        return source
    sampling = {"fps": fps, "max_frames": max_frames}
    if isinstance(source, (bytes, bytearray, memoryview)):
        return vlm_pb2.Video(data=checked(bytes(source), "the video data"), **sampling)
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        return vlm_pb2.Video(url=source, **sampling)
    if isinstance(source, (str, Path)):
        return vlm_pb2.Video(data=checked(Path(source).read_bytes(), str(source)), **sampling)
    raise TypeError(f"cannot send {type(source).__name__} as a video; use a path, bytes or a URL")


def checked(data: bytes, name: str) -> bytes:
    """`data` if its first bytes are a container the service reads (`name` says what it is in the error)."""
    from vlm_serving.preprocessing.video import VideoError, VideoLimits, check_encoded

    try:
        # The size limit is the deployment's (VLM_MAX_VIDEO_BYTES): the gateway judges it.
        check_encoded(data, VideoLimits(max_bytes=max(len(data), 1)))
    except VideoError as error:
        raise ValueError(f"{name} is not a video the service reads: {error}") from None
    return data
