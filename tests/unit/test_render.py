from dataclasses import replace

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from vlm_serving.deploy.render import FAMILIES, PROFILES, render_family, render_repository


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_rendered_config_is_a_valid_model_config(profile, family):
    configs = {name: parse(text) for name, text in render_family(family, PROFILES[profile]).items()}
    assert set(configs) == {family, f"{family}_preprocess", f"{family}_generate"}
    for name, config in configs.items():
        assert config.name == name
        if name != family:
            assert config.backend == "python"
            batching = config.dynamic_batching
            assert batching.preferred_batch_size and batching.max_queue_delay_microseconds > 0
            assert batching.default_queue_policy.max_queue_size > 0, "overload must be refused, not queued forever"
    assert configs[f"{family}_generate"].model_transaction_policy.decoupled


def test_cpu_profile_runs_everything_on_cpu_instances():
    for config in map(parse, render_family("qwen2_5_vl", PROFILES["cpu"]).values()):
        for group in config.instance_group:
            assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU


def test_gpu_profile_puts_generation_on_each_listed_gpu():
    profile = replace(PROFILES["gpu"], gpus=(0, 1), generate_instances=2, quantization="bnb-nf4")
    configs = {name: parse(text) for name, text in render_family("pixtral", profile).items()}
    [group] = configs["pixtral_generate"].instance_group
    assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert list(group.gpus) == [0, 1] and group.count == 2
    assert configs["pixtral_generate"].parameters["quantization"].string_value == "bnb-nf4"
    [preprocess_group] = configs["pixtral_preprocess"].instance_group
    assert preprocess_group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU


def test_ensemble_wires_preprocess_into_generate():
    ensemble = parse(render_family("qwen2_5_vl", PROFILES["cpu"])["qwen2_5_vl"])
    preprocess, generate = ensemble.ensemble_scheduling.step
    assert (preprocess.model_name, generate.model_name) == ("qwen2_5_vl_preprocess", "qwen2_5_vl_generate")
    produced = set(preprocess.output_map.values())
    internal = {value for value in generate.input_map.values() if value.startswith("_")}
    assert internal == produced == {"_INPUT_IDS", "_PIXEL_VALUES", "_IMAGE_GRID_THW", "_IMAGE_TOKENS"}
    assert {o.name for o in ensemble.output} == set(generate.output_map.values())
    assert ensemble.max_batch_size <= min(PROFILES["cpu"].generate_batching.max_batch_size,
                                          PROFILES["cpu"].preprocess_batching.max_batch_size)


def test_render_repository_writes_one_config_per_model(tmp_path):
    written = render_repository(tmp_path, PROFILES["cpu"])
    assert sorted(p.parent.name for p in written) == sorted(
        ["cancel"] + list(FAMILIES) + [f"{f}_preprocess" for f in FAMILIES] + [f"{f}_generate" for f in FAMILIES]
    )
    cancel = parse((tmp_path / "cancel" / "config.pbtxt").read_text())
    assert cancel.input[0].name == "REQUEST_IDS" and cancel.instance_group[0].count == 1
