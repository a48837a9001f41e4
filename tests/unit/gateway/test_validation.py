import grpc
import pytest
from vlm.v1 import vlm_pb2

from gateway.errors import ApiError
from gateway.settings import Settings, SettingsError
from gateway.validation import validate
from tests.conftest import encode, picture

SETTINGS = Settings(api_keys=frozenset({"k"}), max_images=2, max_image_bytes=50_000, max_prompt_chars=100,
                    image_url_allowlist=("images.internal",))
PNG = encode(picture(20, 20))
FORMAT = vlm_pb2.ResponseFormat


def request(*parts, role="user", model="pixtral", **config):
    return vlm_pb2.GenerateRequest(
        model=model, messages=[vlm_pb2.Message(role=role, parts=list(parts))], config=vlm_pb2.GenerationConfig(**config)
    )


def text(value):
    return vlm_pb2.Part(text=value)


def image(**source):
    return vlm_pb2.Part(image=vlm_pb2.Image(**source))


def violations(req):
    with pytest.raises(ApiError) as caught:
        validate(req, SETTINGS, stream=False)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return dict(caught.value.violations)


def test_valid_request_becomes_chat_messages_with_defaults():
    call = validate(request(image(data=PNG), text("What is it?")), SETTINGS, stream=True)
    assert call.ensemble == "pixtral" and len(call.request_id) == 32
    assert call.messages == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    assert call.images[0].data == PNG and call.images[0].field == "messages[0].parts[0].image.data"
    params = call.params
    # Unset sampling fields stay unset: the model's defaults apply to them in the generation step.
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k, params.repetition_penalty,
            params.seed, params.stream) == (None, None, None, None, None, None, True)


def test_explicit_zero_temperature_and_top_k_are_kept_apart_from_unset():
    params = validate(request(text("x"), temperature=0.0, top_k=0, top_p=0.0, repetition_penalty=0.0),
                      SETTINGS, stream=False).params
    # 0 is greedy / no cut for these two; for top_p and the penalty 0 is out of range and means unset.
    assert (params.temperature, params.top_k, params.top_p, params.repetition_penalty) == (0.0, 0, None, None)


def test_seed_zero_is_a_seed_not_unset():
    assert validate(request(text("x"), seed=0), SETTINGS, stream=False).params.seed == 0


def test_unknown_model_is_not_found_and_lists_the_models():
    with pytest.raises(ApiError) as caught:
        validate(request(text("x"), model="gpt-4"), SETTINGS, stream=False)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND and "pixtral, qwen2.5-vl" in caught.value.message


def test_missing_model_names_the_field():
    assert "model" in violations(request(text("x"), model=""))


@pytest.mark.parametrize(
    "req,field,message",
    [
        (request(image(data=b"")), "messages[0].parts[0].image.data", "empty image data"),
        (request(image(data=b"\x00" * 10)), "messages[0].parts[0].image.data", "not a supported image file"),
        (request(image(data=b"\x89PNG\r\n\x1a\n" + b"0" * 60_000)), "messages[0].parts[0].image.data",
         "over the limit of 50000 bytes"),
        (request(image(url="ftp://images.internal/a.png")), "messages[0].parts[0].image.url", "only http(s)"),
        (request(image(url="http://evil.example/a.png")), "messages[0].parts[0].image.url", "not on this service's image URL allowlist"),
        (request(image(url="http://user:pw@images.internal/a.png")), "messages[0].parts[0].image.url", "credentials"),
        (request(vlm_pb2.Part(image=vlm_pb2.Image())), "messages[0].parts[0].image", "set either data or url"),
        (request(vlm_pb2.Part()), "messages[0].parts[0]", "set text, image or video"),
        (request(text("x"), role="robot"), "messages[0].role", "'robot' is not one of"),
        (request(), "messages[0].parts", "at least one part"),
        (request(text("y" * 101)), "messages", "101 characters of text is over the limit of 100"),
        (request(*[image(data=PNG)] * 3), "messages", "3 images is over the limit of 2"),
        (request(text("x"), max_tokens=5000), "config.max_tokens", "max_tokens=5000 must be in [1, 4096]"),
        (request(text("x"), temperature=2.5), "config.temperature", "must be in [0, 2]"),
        (request(text("x"), top_p=1.5), "config.top_p", "must be in (0, 1]"),
        (request(text("x"), top_k=5000), "config.top_k", "must be in [0, 1000]"),
        (request(text("x"), repetition_penalty=3), "config.repetition_penalty", "must be in (0, 2]"),
        (request(text("x"), stop=[""]), "config.stop", "1 to 64 characters"),
        (request(text("x"), response_format=FORMAT(type=FORMAT.RESPONSE_FORMAT_JSON_SCHEMA, json_schema="{nope")),
         "config.response_format", "the schema is not JSON"),
        (request(text("x"), response_format=FORMAT(type=FORMAT.RESPONSE_FORMAT_JSON_SCHEMA, json_schema='{"type": 5}')),
         "config.response_format", "not a valid JSON Schema at type"),
        (request(text("x"), response_format=FORMAT(type=FORMAT.RESPONSE_FORMAT_JSON_SCHEMA,
                                                    json_schema='{"if": {"type": "string"}}')),
         "config.response_format", "#/if is not supported"),
        (request(text("x"), response_format=FORMAT(type=FORMAT.RESPONSE_FORMAT_REGEX)), "config.response_format",
         "the pattern is empty"),
        (request(text("x"), response_format=FORMAT(type=FORMAT.RESPONSE_FORMAT_CHOICE)), "config.response_format",
         "give 1 to 64 choices"),
        (request(text("x"), response_format=FORMAT(type=9)), "config.response_format", "type must be one of"),
    ],
)
def test_each_bad_field_is_named_with_what_to_fix(req, field, message):
    found = violations(req)
    assert field in found and message in found[field], found


def test_a_response_format_becomes_its_canonical_wire_form():
    schema = '{ "type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}} }'
    call = validate(request(text("x"), response_format=FORMAT(type=FORMAT.RESPONSE_FORMAT_JSON_SCHEMA, json_schema=schema)),
                    SETTINGS, stream=False)
    # Compact, and in the caller's order: properties are generated in the order the schema gives them.
    assert call.params.response_format.to_wire() == (
        '{"type":"json_schema","schema":{"type":"object","required":["a"],"properties":{"a":{"type":"integer"}}}}')
    assert not validate(request(text("x")), SETTINGS, stream=False).params.response_format.constrained


def test_all_violations_are_reported_at_once():
    found = violations(request(image(data=b""), text("x"), role="robot", temperature=9))
    assert set(found) == {"messages[0].parts[0].image.data", "messages[0].role", "config.temperature"}


def test_empty_messages_and_bad_request_id():
    found = violations(vlm_pb2.GenerateRequest(model="pixtral", request_id="bad id with spaces"))
    assert set(found) == {"messages", "request_id"}


def test_allowlisted_url_passes_validation_unfetched():
    call = validate(request(image(url="https://images.internal/cat.png")), SETTINGS, stream=False)
    assert call.images[0].url == "https://images.internal/cat.png" and call.images[0].data is None


def test_settings_from_env():
    settings = Settings.from_env({
        "VLM_API_KEYS": "a, b", "VLM_ADMIN_API_KEYS": "root", "VLM_MODELS": "small=pixtral",
        "VLM_MAX_IMAGE_BYTES": "1000", "VLM_IMAGE_URL_ALLOWLIST": "cdn.internal,127.0.0.1:9000",
    })
    assert settings.api_keys == {"a", "b", "root"} and settings.admin_api_keys == {"root"}
    assert settings.models == {"small": "pixtral"} and settings.max_image_bytes == 1000
    assert settings.image_url_allowlist == ("cdn.internal", "127.0.0.1:9000")
    assert settings.listen_address == "localhost:50051"


@pytest.mark.parametrize("env,message", [
    ({}, "VLM_API_KEYS is empty"),
    ({"VLM_API_KEYS": "k", "VLM_MAX_IMAGES": "many"}, "VLM_MAX_IMAGES='many' is not a valid int"),
    ({"VLM_API_KEYS": "k", "VLM_MODELS": "nonsense"}, "VLM_MODELS must look like"),
])
def test_bad_settings_say_what_to_fix(env, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


def conversation(*messages):
    return vlm_pb2.GenerateRequest(model="pixtral", messages=list(messages))


def message(role, *parts, **fields):
    return vlm_pb2.Message(role=role, parts=list(parts), **fields)


CALL = vlm_pb2.ToolCall(id="call_1", name="weather", arguments='{"city":"Paris"}')


@pytest.mark.parametrize("req,field,message", [
    (request(*[text("x")] * 65), "messages[0].parts", "65 parts is over the limit of 64 per message"),
    (conversation(*[message("user", *[text("x")] * 60)] * 5), "messages", "300 parts is over the limit of 256"),
    (request(text("x"), text("")), "messages[0].parts[1].text", "empty; leave the part out"),
    (request(image(data=PNG), text("x"), role="system"), "messages[0].parts[0].image", "a system message holds text only"),
    (conversation(message("user", text("x")), message("tool", text("18C"))), "messages[1].tool_call_id", "required"),
    (conversation(message("user", text("x")), message("tool", text("18C"), tool_call_id="call_9")),
     "messages[1].tool_call_id", "'call_9' is not the id of a call of the last assistant message still unanswered"),
    (conversation(message("assistant", tool_calls=[CALL]), message("tool", text("a"), tool_call_id="call_1"),
                  message("tool", text("b"), tool_call_id="call_1")), "messages[2].tool_call_id", "still unanswered"),
    (conversation(message("user", text("x"), tool_calls=[CALL])), "messages[0].tool_calls",
     "only an assistant message carries tool calls"),
    (conversation(message("assistant", tool_calls=[vlm_pb2.ToolCall(id="c", name="w", arguments="[1]")])),
     "messages[0].tool_calls[0].arguments", "a JSON object"),
    (conversation(message("assistant", tool_calls=[vlm_pb2.ToolCall(id="bad id", name="w", arguments="{}")])),
     "messages[0].tool_calls[0].id", "1 to 64 letters"),
    (conversation(message("user", text("x"), tool_call_id="call_1")), "messages[0].tool_call_id",
     "only a tool message answers a call"),
    (request(text("x"), presence_penalty=3), "config.presence_penalty", "must be in [-2, 2]"),
    (vlm_pb2.GenerateRequest(model="pixtral", messages=[message("user", text("x"))],
                             tools=[vlm_pb2.Tool(name="t", description="d" * 8193)]),
     "tools[0].description", "8193 characters is over the limit of 8192"),
    (request(text("x"), logprobs=True, top_logprobs=21), "config.top_logprobs", "must be in [0, 20]"),
])
def test_bounds_on_counts_and_the_shape_of_a_conversation(req, field, message):
    found = violations(req)
    assert field in found and message in found[field], found


def test_a_part_flood_is_refused_without_looking_at_its_parts():
    found = violations(request(*[vlm_pb2.Part()] * 100_000))
    assert found == {"messages[0].parts": "100000 parts is over the limit of 64 per message"}


def test_a_tool_loop_becomes_the_preprocessors_messages():
    call = validate(conversation(
        message("system", text("Be brief.")), message("user", image(data=PNG), text("Weather here?")),
        message("assistant", tool_calls=[CALL]), message("tool", text("18C, sunny"), tool_call_id="call_1"),
    ), SETTINGS, stream=False)
    assert call.messages == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Weather here?"}]},
        {"role": "assistant", "content": [], "tool_calls": [{"id": "call_1", "name": "weather",
                                                            "arguments": '{"city":"Paris"}'}]},
        {"role": "tool", "content": [{"type": "text", "text": "18C, sunny"}], "tool_call_id": "call_1"},
    ]
    assert len(call.images) == 1


def test_unset_max_tokens_is_the_deployments_default_or_until_the_context_ends():
    assert validate(request(text("x")), SETTINGS, stream=False).params.max_tokens is None
    settings = Settings(api_keys=frozenset({"k"}), default_max_tokens=100)
    assert validate(request(text("x")), settings, stream=False).params.max_tokens == 100
    assert validate(request(text("x"), max_tokens=7), settings, stream=False).params.max_tokens == 7


@pytest.mark.parametrize("mode", [vlm_pb2.ToolChoice.TOOL_CHOICE_REQUIRED, vlm_pb2.ToolChoice.TOOL_CHOICE_NAMED])
def test_a_call_asked_of_a_tool_whose_parameters_are_not_json_is_refused_naming_them(mode):
    """Found by the gRPC fuzzing (tests/integration/test_grpc_fuzz.py): the call's format was built from the
    parameters before their violation was reported, and their JSON error became INTERNAL."""
    asked = request(vlm_pb2.Part(text="hi"))
    asked.tools.add(name="zoom", parameters="{")
    asked.tool_choice.mode, asked.tool_choice.name = mode, "zoom" if mode == vlm_pb2.ToolChoice.TOOL_CHOICE_NAMED else ""
    with pytest.raises(ApiError) as refused:
        validate(asked, SETTINGS, stream=False)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in refused.value.violations] == ["tools[0].parameters"], refused.value.violations
