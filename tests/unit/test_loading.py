import pytest
import torch

from vlm_serving.generation.loading import CheckpointError, load_model


def test_missing_checkpoint_says_how_to_get_one(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at .*make models"):
        load_model(tmp_path / "nowhere")


def test_unknown_quantization(checkpoints):
    with pytest.raises(CheckpointError, match="'int4' is not one of none, int8, bnb-int8, bnb-nf4, awq"):
        load_model(checkpoints / "qwen2_5_vl", "int4")


@pytest.mark.parametrize("mode", ["bnb-int8", "bnb-nf4", "awq"])
def test_gpu_quantizations_refuse_cpu_instances(checkpoints, mode):
    with pytest.raises(CheckpointError, match="needs a GPU instance"):
        load_model(checkpoints / "pixtral", mode)


def test_awq_needs_an_awq_checkpoint(checkpoints):
    with pytest.raises(CheckpointError, match="not an AWQ checkpoint"):
        load_model(checkpoints / "pixtral", "awq", device="cuda:0")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bitsandbytes quantization)")
@pytest.mark.parametrize("mode", ["bnb-int8", "bnb-nf4"])
def test_bitsandbytes_quantization_on_gpu(checkpoints, mode):
    import bitsandbytes as bnb
    model = load_model(checkpoints / "qwen2_5_vl", mode, device="cuda:0")
    quantized = (bnb.nn.Linear8bitLt,) if mode == "bnb-int8" else (bnb.nn.Linear4bit,)
    assert any(isinstance(module, quantized) for module in model.modules())


def requirement_names(path) -> set[str]:
    from tests.conftest import REPO_ROOT

    lines = (REPO_ROOT / path).read_text().splitlines()
    return {line.split("==")[0].strip().lower() for line in lines if "==" in line and not line.startswith("#")}


@pytest.mark.parametrize("mode", ["bnb-int8", "bnb-nf4"])
def test_bitsandbytes_modes_pass_transformers_environment_checks(checkpoints, mode):
    """Everything up to the GPU: the quantization config is built and transformers' quantizer
    finds every package it needs (before: ImportError, accelerate missing)."""
    from transformers.quantizers import AutoHfQuantizer

    from vlm_serving.generation.loading import load_kwargs

    kwargs = load_kwargs(checkpoints / "qwen2_5_vl", mode, "cuda:0")
    quantizer = AutoHfQuantizer.from_config(kwargs["quantization_config"], pre_quantized=False)
    quantizer.validate_environment(device_map=kwargs["device_map"])
    assert {"bitsandbytes", "accelerate"} <= requirement_names("requirements-triton.txt")


def test_awq_mode_builds_its_config_and_the_gpu_image_has_its_backend(checkpoints, tmp_path):
    """gptqmodel (AWQ's backend in transformers 5) compiles CUDA kernels at install, so it cannot
    be installed here: the config is built and the GPU image's requirements declare it."""
    import json

    from transformers import AwqConfig
    from transformers.quantizers import AutoHfQuantizer

    from vlm_serving.generation.loading import load_kwargs

    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}}))
    kwargs = load_kwargs(tmp_path, "awq", "cuda:0")
    assert kwargs["device_map"] == {"": "cuda:0"}
    quantizer = AutoHfQuantizer.from_config(AwqConfig(bits=4, group_size=128, version="gemm"), pre_quantized=True)
    with pytest.raises(ImportError, match="gptqmodel"):  # the one piece missing on this CPU machine
        quantizer.validate_environment(device_map=kwargs["device_map"])
    assert {"gptqmodel", "accelerate"} <= requirement_names("requirements-triton.txt")


def test_the_tiny_checkpoints_are_readable_by_any_user(tmp_path):
    # The Kubernetes pods run Triton as uid 1000, whoever built the files (safetensors writes 0600).
    import stat

    from vlm_serving import tiny_checkpoints

    tiny_checkpoints.main([str(tmp_path)])
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert files and all(path.stat().st_mode & stat.S_IROTH for path in files), [
        (path.name, oct(path.stat().st_mode)) for path in files if not path.stat().st_mode & stat.S_IROTH]
