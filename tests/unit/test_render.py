from dataclasses import replace

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from vlm_serving.deploy.render import PROFILES, render_family, render_repository
from vlm_serving.pipelines import FAMILIES


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_rendered_config_is_a_valid_model_config(profile, family):
    configs = {name: parse(text) for name, text in render_family(family, PROFILES[profile]).items()}
    assert set(configs) == {family} | {f"{family}_{role}" for role in ("preprocess", "embed", "encoder", "generate")}
    for name, config in configs.items():
        assert config.name == name
        if name != family:
            assert config.backend == "python"
            batching = config.dynamic_batching
            if name != f"{family}_generate":
                assert batching.preferred_batch_size and batching.max_queue_delay_microseconds > 0
            assert batching.default_queue_policy.max_queue_size > 0, "overload must be refused, not queued forever"
    assert configs[f"{family}_generate"].model_transaction_policy.decoupled


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_the_generation_scheduler_and_its_limits_are_rendered(profile):
    from vlm_serving.generation.scheduling import EngineLimits

    inflight = parse(render_family("qwen2_5_vl", PROFILES[profile])["qwen2_5_vl_generate"])
    assert inflight.parameters["scheduler"].string_value == "inflight"
    assert EngineLimits.from_parameters({k: v.string_value for k, v in inflight.parameters.items()}) == PROFILES[profile].engine
    # In flight, Triton hands every request to the engine at once: no delay, no preferred sizes.
    assert inflight.dynamic_batching.max_queue_delay_microseconds == 0 and not inflight.dynamic_batching.preferred_batch_size
    static = parse(render_family("qwen2_5_vl", replace(PROFILES[profile], scheduler="static"))["qwen2_5_vl_generate"])
    assert static.parameters["scheduler"].string_value == "static"
    assert static.dynamic_batching.max_queue_delay_microseconds == PROFILES[profile].generate_batching.max_queue_delay_us > 0
    assert list(static.dynamic_batching.preferred_batch_size) == list(PROFILES[profile].generate_batching.preferred_batch_sizes)


def test_render_cli_sets_the_scheduler_and_engine_limits(tmp_path):
    from vlm_serving.deploy.render import main

    main(["--repository", str(tmp_path), "--scheduler", "static", "--max-running", "4", "--cache-tokens", "9000",
          "--prefill-chunk-tokens", "128"])
    parameters = parse((tmp_path / "pixtral_generate" / "config.pbtxt").read_text()).parameters
    assert {key: parameters[key].string_value for key in ("scheduler", "max_running", "cache_tokens", "prefill_chunk_tokens")} \
        == {"scheduler": "static", "max_running": "4", "cache_tokens": "9000", "prefill_chunk_tokens": "128"}


def test_render_cli_sets_the_paged_cache_block_and_prefix_caching(tmp_path):
    from vlm_serving.deploy.render import main
    from vlm_serving.generation.scheduling import EngineLimits

    main(["--repository", str(tmp_path), "--block-tokens", "32", "--no-prefix-caching"])
    parameters = parse((tmp_path / "qwen2_5_vl_generate" / "config.pbtxt").read_text()).parameters
    limits = EngineLimits.from_parameters({key: value.string_value for key, value in parameters.items()})
    assert (limits.block_tokens, limits.prefix_caching) == (32, False)
    main(["--repository", str(tmp_path)])
    parameters = parse((tmp_path / "qwen2_5_vl_generate" / "config.pbtxt").read_text()).parameters
    assert (parameters["block_tokens"].string_value, parameters["prefix_caching"].string_value) == ("16", "true")


def test_cpu_profile_runs_everything_on_cpu_instances():
    for config in map(parse, render_family("qwen2_5_vl", PROFILES["cpu"]).values()):
        for group in config.instance_group:
            assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU


def test_gpu_profile_puts_generation_and_encoders_on_each_listed_gpu():
    profile = replace(PROFILES["gpu"], gpus=(0, 1), generate_instances=2, encoder_instances=3, quantization="bnb-nf4")
    configs = {name: parse(text) for name, text in render_family("pixtral", profile).items()}
    [group] = configs["pixtral_generate"].instance_group
    assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert list(group.gpus) == [0, 1] and group.count == 2
    assert configs["pixtral_generate"].parameters["quantization"].string_value == "bnb-nf4"
    [encoder_group] = configs["pixtral_encoder"].instance_group
    assert encoder_group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert list(encoder_group.gpus) == [0, 1] and encoder_group.count == 3, "encoders scale apart from the LM"
    assert configs["pixtral_encoder"].parameters["variant"].string_value == "fp16"
    for cpu_model in ("pixtral_preprocess", "pixtral_embed"):
        [cpu_group] = configs[cpu_model].instance_group
        assert cpu_group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert configs["pixtral_embed"].instance_group[0].count == 1, "one instance holds the one cache"


@pytest.mark.parametrize("family", FAMILIES)
def test_ensemble_wires_preprocess_embed_generate(family):
    configs = {name: parse(text) for name, text in render_family(family, PROFILES["cpu"]).items()}
    ensemble = configs[family]
    preprocess, embed, generate = ensemble.ensemble_scheduling.step
    assert [s.model_name for s in (preprocess, embed, generate)] == [f"{family}_{r}" for r in ("preprocess", "embed", "generate")]
    produced = set(preprocess.output_map.values()) | set(embed.output_map.values())
    consumed = {v for step in (embed, generate) for v in step.input_map.values() if v.startswith("_")}
    assert consumed == produced, "every internal tensor is produced once and used"
    # The embed step takes exactly the encoder's inputs and the REQUEST_ID, and each step's declared inputs are mapped.
    encoder = configs[f"{family}_encoder"]
    assert set(embed.input_map) == {i.name for i in encoder.input} | {"REQUEST_ID"} == {
        i.name for i in configs[f"{family}_embed"].input}
    # Every step reads the cancellation board by the request's id (its caller may have gone).
    assert preprocess.input_map["REQUEST_ID"] == embed.input_map["REQUEST_ID"] == generate.input_map["REQUEST_ID"]
    assert set(generate.input_map) >= {i.name for i in configs[f"{family}_generate"].input if not i.optional}
    assert "_IMAGE_EMBEDS" in generate.input_map.values()
    assert {o.name for o in ensemble.output} == set(generate.output_map.values())
    assert ensemble.max_batch_size <= min(PROFILES["cpu"].generate_batching.max_batch_size,
                                          PROFILES["cpu"].preprocess_batching.max_batch_size)


def test_render_repository_writes_one_config_per_model(tmp_path):
    written = render_repository(tmp_path, PROFILES["cpu"])
    assert sorted(p.parent.name for p in written) == sorted(
        ["cancel", "auto"] + list(FAMILIES)
        + [f"{f}_{role}" for f in FAMILIES for role in ("preprocess", "embed", "encoder", "generate")]
    )
    cancel = parse((tmp_path / "cancel" / "config.pbtxt").read_text())
    assert cancel.input[0].name == "REQUEST_IDS" and cancel.instance_group[0].count == 1


def test_generate_config_carries_the_checkpoints_sampling_defaults(tmp_path):
    import json

    from vlm_serving.generation.sampling import SamplingDefaults

    (tmp_path / "pixtral").mkdir()
    (tmp_path / "pixtral" / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.3, "top_p": 0.9, "repetition_penalty": 1.1}))
    config = parse(render_family("pixtral", replace(PROFILES["cpu"], checkpoints_dir=tmp_path))["pixtral_generate"])
    rendered = json.loads(config.parameters["sampling_defaults"].string_value)
    # top_k unset in the file: transformers' own default when sampling (50), as plain generate would use.
    assert rendered == {"temperature": 0.3, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.1}
    assert SamplingDefaults(**rendered).to_json() == config.parameters["sampling_defaults"].string_value
    greedy = parse(render_family("pixtral", replace(PROFILES["cpu"], checkpoints_dir=tmp_path / "none"))["pixtral_generate"])
    assert json.loads(greedy.parameters["sampling_defaults"].string_value) == SamplingDefaults().__dict__


def test_test_repositories_hold_only_the_tracked_version_folders(tmp_path, checkpoints):
    """Version folders a user ships into the working tree (docs/operations.md: Updating models) never reach
    the tests' repositories (before: versions 2 and 3 left there failed six tests far from the cause)."""
    from tests.integration.conftest import make_repository

    source = tmp_path / "working_tree"
    for version in ("1", "2", "3"):
        (source / "qwen2_5_vl_generate" / version).mkdir(parents=True)
        (source / "qwen2_5_vl_generate" / version / "model.py").write_text(f"# version {version}\n")
    (source / "qwen2_5_vl_generate" / "1" / "checkpoint").mkdir()
    (source / "qwen2_5_vl_generate" / "config.pbtxt").write_text("hand edited")
    repository = make_repository(tmp_path / "repository", checkpoints, source=source)
    model = repository / "qwen2_5_vl_generate"
    assert sorted(p.name for p in model.iterdir()) == ["1", "config.pbtxt"]
    assert sorted(p.name for p in (model / "1").iterdir()) == ["model.py"]
    assert "hand edited" not in (model / "config.pbtxt").read_text()


def test_generate_config_carries_the_checkpoints_context(tmp_path, checkpoints):
    from transformers import AutoConfig

    for family in FAMILIES:
        config = parse(render_family(family, replace(PROFILES["cpu"], checkpoints_dir=checkpoints))[f"{family}_generate"])
        expected = AutoConfig.from_pretrained(checkpoints / family).get_text_config().max_position_embeddings
        assert int(config.parameters["context_tokens"].string_value) == expected
    missing = parse(render_family("pixtral", replace(PROFILES["cpu"], checkpoints_dir=tmp_path))["pixtral_generate"])
    assert missing.parameters["context_tokens"].string_value == "0"


def test_the_router_config_takes_the_ensembles_inputs_and_the_routing_options():
    import math

    from vlm_serving.deploy.render import render_router

    config = parse(render_router(PROFILES["cpu"]))
    inputs = {tensor.name: tensor for tensor in config.input}
    assert {"MESSAGES", "IMAGES", "DETAIL", "MAX_TOKENS", "STREAM", "REQUEST_ID", "CONFIDENCE_THRESHOLD", "FALLBACK"} <= set(inputs)
    assert inputs["CONFIDENCE_THRESHOLD"].optional and inputs["FALLBACK"].optional
    assert "ROUTE_INFO" in {tensor.name for tensor in config.output}
    assert config.model_transaction_policy.decoupled
    assert float(config.parameters["confidence_threshold"].string_value) == pytest.approx(math.log(0.85), abs=1e-5)


def test_penalties_and_logprobs_reach_every_model_that_takes_request_parameters():
    from vlm_serving.deploy.render import render_router

    DataType = model_config_pb2.DataType
    new = {"PRESENCE_PENALTY": DataType.TYPE_FP32, "FREQUENCY_PENALTY": DataType.TYPE_FP32,
           "LOGPROBS": DataType.TYPE_BOOL, "TOP_LOGPROBS": DataType.TYPE_INT32}
    configs = {"auto": parse(render_router(PROFILES["cpu"]))}
    for family in FAMILIES:
        rendered = render_family(family, PROFILES["cpu"])
        configs |= {name: parse(rendered[name]) for name in (family, f"{family}_generate")}
        [*_, generate_step] = configs[family].ensemble_scheduling.step
        assert {key: generate_step.input_map[key] for key in new} == {key: key for key in new}
        assert generate_step.output_map["TOKEN_LOGPROBS"] == "TOKEN_LOGPROBS"
    for name, config in configs.items():
        inputs = {tensor.name: tensor for tensor in config.input}
        assert {key: (inputs[key].data_type, inputs[key].optional) for key in new} == {key: (kind, True) for key, kind in new.items()}, name
        outputs = {tensor.name: tensor.data_type for tensor in config.output}
        assert outputs["TOKEN_LOGPROBS"] == DataType.TYPE_STRING, name


def test_the_preprocessing_instances_follow_the_cores_the_renderer_may_use(monkeypatch):
    """By default, half the cores on the CPU profile (the models compute on the rest) and three quarters
    on the GPU profile, two at least; a profile's own count wins."""
    from vlm_serving.deploy import render

    def instances(profile: str, family: str = "qwen2_5_vl") -> int:
        [group] = parse(render_family(family, PROFILES[profile])[f"{family}_preprocess"]).instance_group
        return group.count

    monkeypatch.setattr(render.os, "sched_getaffinity", lambda pid: set(range(32)))
    assert (instances("cpu"), instances("gpu"), instances("cpu", "pixtral")) == (16, 24, 16)
    monkeypatch.setattr(render.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    assert (instances("cpu"), instances("gpu")) == (3, 4)
    monkeypatch.setattr(render.os, "sched_getaffinity", lambda pid: {0})
    assert (instances("cpu"), instances("gpu")) == (2, 2)
    assert render.preprocess_instances(replace(PROFILES["gpu"], preprocess_instances=5), cores=64) == 5


def test_render_cli_sets_the_preprocessing_instances(tmp_path, capsys):
    from vlm_serving.deploy.render import main

    main(["--repository", str(tmp_path), "--preprocess-instances", "3"])
    for family in FAMILIES:
        [group] = parse((tmp_path / f"{family}_preprocess" / "config.pbtxt").read_text()).instance_group
        assert (group.count, group.kind) == (3, model_config_pb2.ModelInstanceGroup.KIND_CPU)
    with pytest.raises(SystemExit):
        main(["--repository", str(tmp_path), "--preprocess-instances", "0"])
    assert "--preprocess-instances 0: use 1 or more" in capsys.readouterr().err
