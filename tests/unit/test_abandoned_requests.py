"""The steps before generation skip requests whose caller has gone (issue 24: abandoned work stops early).

The preprocess and embed adapters run in-process on a stand-in for Triton's Python-backend utilities
(tests/unit/fake_pb_utils.py), configured by the very configs the renderer writes; the gateway puts a
request it gives up on onto the cancellation board, as the `cancel` model does.
"""

from __future__ import annotations

import asyncio
import importlib
import json
from dataclasses import replace

import numpy as np
import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from tests.conftest import FAMILIES, encode, picture
from tests.unit import fake_pb_utils
from tests.unit.fake_pb_utils import ReceivedRequest, request_id
from vlm_serving.deploy.render import PROFILES, render_family
from vlm_serving.encoding.encoder_inputs import OUTPUT_ROWS_FROM, SPECS, PackedImages, unpack
from vlm_serving.generation import cancellation
from vlm_serving.generation.cancellation import CancellationBoard

SKIPPED = "vlm_abandoned_requests_skipped_total"
MESSAGES = json.dumps([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}])


@pytest.fixture
def triton(monkeypatch, tmp_path):
    """The stand-in installed, and the board the adapters open (a file of this test's own)."""
    monkeypatch.setattr(cancellation, "board_path", lambda server_pid=None: tmp_path / "board")
    with fake_pb_utils.installed() as pb_utils:
        yield pb_utils


def initialized(adapter: str, model: str, checkpoints, tmp_path):
    """The adapter's model, initialized from the config the CPU profile renders for `model`."""
    family = model.rsplit("_", 1)[0]
    text = render_family(family, replace(PROFILES["cpu"], checkpoints_dir=checkpoints))[model]
    config = json_format.MessageToDict(text_format.Parse(text, model_config_pb2.ModelConfig()),
                                       preserving_proto_field_name=True)
    instance = importlib.import_module(f"vlm_serving.backend.{adapter}").TritonPythonModel()
    instance.initialize({"model_config": json.dumps(config), "model_name": model, "model_version": "1",
                         "model_instance_name": f"{model}_0_0", "model_repository": str(tmp_path / model)})
    return instance


def preprocess_request(identity: str | None, image: bytes) -> ReceivedRequest:
    tensors = {"MESSAGES": np.array([[MESSAGES.encode()]], dtype=np.object_),
               "IMAGES": np.array([[image]], dtype=np.object_)}
    if identity is not None:
        tensors["REQUEST_ID"] = request_id(identity)
    return ReceivedRequest(tensors)


def skipped_count() -> float:
    return sum(value for _, value in fake_pb_utils.metric_values(SKIPPED))


@pytest.mark.parametrize("family", FAMILIES)
def test_preprocessing_skips_requests_whose_caller_has_gone_without_decoding_their_images(
        triton, family, checkpoints, tmp_path):
    model = initialized("preprocess_model", f"{family}_preprocess", checkpoints, tmp_path)
    decoded = []
    preprocessor = model.preprocessor

    def recording(images, messages, **options):
        decoded.append(names[images[0]])
        if names[images[0]] == "first":  # the caller of a later request of this batch gives up meanwhile
            CancellationBoard().cancel("gave-up-meanwhile")
        return preprocessor(images, messages, **options)

    model.preprocessor = recording
    first, gone, meanwhile, no_id, direct = (encode(picture(64 + 8 * seed, 48, seed=seed)) for seed in range(5))
    names = {first: "first", gone: "gone", meanwhile: "meanwhile", no_id: "no_id", direct: "direct"}
    CancellationBoard().cancel("gone")  # the gateway's `cancel` call, before this batch ran
    requests = [preprocess_request("here", first), preprocess_request("gone", gone),
                preprocess_request("gave-up-meanwhile", meanwhile), preprocess_request(None, no_id),
                ReceivedRequest(preprocess_request("direct", direct).tensors, cancelled=True)]

    responses = model.execute(requests)

    assert decoded == ["first", "no_id"], "only the requests whose caller is still there are decoded"
    for index in (1, 2, 4):
        error = responses[index].error()
        assert error is not None and error.code() == triton.TritonError.CANCELLED, index
        assert error.message().startswith("CANCELLED: ") and "skipped" in error.message()
    for index in (0, 3):
        assert not responses[index].has_error()
        assert triton.get_output_tensor_by_name(responses[index], "IMAGE_TOKENS").as_numpy()[0, 0] > 0
    assert skipped_count() == 3
    [(labels, _)] = fake_pb_utils.metric_values(SKIPPED)
    assert labels == {"model": f"{family}_preprocess", "version": "1", "instance": f"{family}_preprocess_0_0"}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_embed_step_skips_requests_whose_caller_has_gone_without_encoding_their_images(
        triton, family, checkpoints, tmp_path):
    preprocess = initialized("preprocess_model", f"{family}_preprocess", checkpoints, tmp_path)
    embed = initialized("embed_model", f"{family}_embed", checkpoints, tmp_path)
    spec = SPECS[family]

    def encoder(model_name, inputs):
        """One row per output token of each image, filled with the call's number."""
        packed = PackedImages({entry.name: inputs[entry.name.upper()][0] for entry in spec}, inputs["IMAGE_LAYOUT"][0])
        rows = sum(len(image[OUTPUT_ROWS_FROM[family]]) for image in unpack(packed, spec))
        embeds = np.full((1, rows, 8), len(fake_pb_utils.bls_calls), dtype=np.float32)
        identity = np.array([[b"encoder/1/fp32/1"]], dtype=np.object_)
        return triton.InferenceResponse([triton.Tensor("IMAGE_EMBEDS", embeds),
                                         triton.Tensor("ENCODER_IDENTITY", identity)])

    triton.bls_handler = encoder
    # Two requests' encoder inputs, as preprocessing made them.
    names = [entry.name.upper() for entry in spec] + ["IMAGE_LAYOUT"]
    preprocessed = preprocess.execute([preprocess_request(None, encode(picture(64 + 8 * seed, 48, seed=seed)))
                                       for seed in range(2)])
    here, gone = ({name: triton.get_output_tensor_by_name(response, name).as_numpy() for name in names}
                  for response in preprocessed)
    CancellationBoard().cancel("gone")

    responses = asyncio.run(embed.execute([ReceivedRequest({**here, "REQUEST_ID": request_id("here")}),
                                           ReceivedRequest({**gone, "REQUEST_ID": request_id("gone")})]))

    assert [name for name, _ in fake_pb_utils.bls_calls] == [f"{family}_encoder"], "one call: the live request's"
    [(_, sent)] = fake_pb_utils.bls_calls
    assert np.array_equal(sent["PIXEL_VALUES"], here["PIXEL_VALUES"]), "only the live request's images were encoded"
    assert not responses[0].has_error()
    assert triton.get_output_tensor_by_name(responses[0], "IMAGE_EMBEDS").as_numpy().shape[1] > 0
    error = responses[1].error()
    assert error is not None and error.code() == triton.TritonError.CANCELLED
    assert skipped_count() == 1
