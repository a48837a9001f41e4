"""transformers' own Qwen2.5-VL video processing, run in the reference environment (build/reference-env,
`make reference-env`: transformers with torchvision, which the service's environment cannot import).
tests/unit/test_qwen_video.py runs it in a subprocess and exchanges arrays as .npz files.

    python qwen_video.py process CHECKPOINT JOB.npz OUT.npz
        JOB: frames_<k> uint8 [frames, H, W, 3] and fps_<k> per clip, max_video_tokens. Each clip goes
        through the checkpoint's Qwen2_5_VLProcessor (AutoProcessor, cap_pixels_per_frame=True) with a
        prompt of one video; OUT:
        pixel_values_videos_<k>, video_grid_thw_<k>, second_per_grid_ts_<k> and video_tokens_<k> (the
        <|video_pad|> tokens in its input_ids).
    python qwen_video.py resize JOB.npz OUT.npz
        JOB: frames_<k> uint8 [frames, 3, H, W] and size_<k> (height, width); OUT: resized_<k>, by
        torchvision's v2 resize as Qwen2VLVideoProcessor calls it (bicubic, antialias).
    python qwen_video.py settings DIR...
        Prints, as JSON, each folder's video processor (AutoVideoProcessor) settings.
"""

import json
import sys

import numpy as np


def process(checkpoint: str, job_path: str, out_path: str) -> None:
    from transformers import AutoProcessor
    from transformers.video_utils import VideoMetadata

    processor = AutoProcessor.from_pretrained(checkpoint, local_files_only=True)
    job, out = np.load(job_path), {}
    # The clip budget the service takes (a checkpoint whose file sets max_video_tokens gives the same):
    # set on the processor, since its resize reads `self.max_video_tokens` and ignores the call's argument.
    processor.video_processor.max_video_tokens = int(job["max_video_tokens"])
    for k in range(sum(name.startswith("frames_") for name in job.files)):
        frames = job[f"frames_{k}"]
        result = processor(
            text=["<|vision_start|><|video_pad|><|vision_end|>"],
            videos=[frames],
            video_metadata=[VideoMetadata(total_num_frames=len(frames), fps=float(job[f"fps_{k}"]))],
            cap_pixels_per_frame=True,
            return_tensors="np",
        )
        out[f"pixel_values_videos_{k}"] = result["pixel_values_videos"]
        out[f"video_grid_thw_{k}"] = result["video_grid_thw"]
        out[f"second_per_grid_ts_{k}"] = np.asarray(result["second_per_grid_ts"], dtype=np.float64)
        out[f"video_tokens_{k}"] = np.int64((result["input_ids"] == processor.video_token_id).sum())
    np.savez(out_path, **out)


def resize(job_path: str, out_path: str) -> None:
    import torch
    import torchvision.transforms.v2.functional as tvF

    job = np.load(job_path)
    out = {}
    for k in range(sum(name.startswith("frames_") for name in job.files)):
        height, width = (int(v) for v in job[f"size_{k}"])
        resized = tvF.resize(torch.from_numpy(job[f"frames_{k}"]), [height, width],
                             interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
        out[f"resized_{k}"] = resized.numpy()
    np.savez(out_path, **out)


def settings(*folders: str) -> None:
    from transformers import AutoVideoProcessor

    found = []
    for folder in folders:
        video = AutoVideoProcessor.from_pretrained(folder, local_files_only=True)
        found.append({
            "class": type(video).__name__,
            "min_pixels": video.size["shortest_edge"], "max_pixels": video.size["longest_edge"],
            "patch_size": video.patch_size, "merge_size": video.merge_size,
            "temporal_patch_size": video.temporal_patch_size, "max_video_tokens": video.max_video_tokens,
            "rescale_factor": video.rescale_factor, "image_mean": list(video.image_mean),
            "image_std": list(video.image_std),
        })
    print(json.dumps(found))


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    {"process": process, "resize": resize, "settings": settings}[command](*arguments)
