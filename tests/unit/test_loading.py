import pytest
import torch

from vlm_serving.loading import CheckpointError, load_model


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
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is installed in the GPU image only")
    model = load_model(checkpoints / "qwen2_5_vl", mode, device="cuda:0")
    quantized = (bnb.nn.Linear8bitLt,) if mode == "bnb-int8" else (bnb.nn.Linear4bit,)
    assert any(isinstance(module, quantized) for module in model.modules())
