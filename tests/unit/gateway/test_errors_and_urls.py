import asyncio
import http.server
import threading

import grpc
import pytest
from grpc_status import rpc_status
from google.rpc import error_details_pb2
from tritonclient.utils import InferenceServerException

from gateway.errors import ApiError, invalid_argument
from gateway.image_urls import fetch
from gateway.settings import Settings
from gateway.triton_backend import to_api_error
from gateway.validation import ImageSource
from tests.conftest import encode, http_host, picture

PNG = encode(picture(12, 12, noise=0))


def test_invalid_argument_carries_bad_request_details():
    status = invalid_argument([("config.top_p", "top_p=2 must be in (0, 1]")]).to_status()
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT and "config.top_p: top_p=2" in status.details
    [(_, binary)] = status.trailing_metadata
    decoded = rpc_status.status_pb2.Status.FromString(binary)
    bad_request = error_details_pb2.BadRequest()
    decoded.details[0].Unpack(bad_request)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [("config.top_p", "top_p=2 must be in (0, 1]")]


@pytest.mark.parametrize(
    "message,status,code,fragment",
    [
        ("failed to connect to all addresses", "StatusCode.UNAVAILABLE", grpc.StatusCode.UNAVAILABLE, "retry with backoff"),
        ("in ensemble 'pixtral', Exceeds maximum queue size", None, grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full"),
        ("Request for unknown model: 'pixtral' is not found", None, grpc.StatusCode.UNAVAILABLE, "model 'pixtral' is not ready"),
        ("in ensemble 'pixtral', INVALID_ARGUMENT: image 1: truncated or corrupt PNG data", None, grpc.StatusCode.INVALID_ARGUMENT, "truncated"),
        ("in ensemble 'pixtral', INVALID_ARGUMENT: messages: the model's chat template refused them", None, grpc.StatusCode.INVALID_ARGUMENT, "chat template"),
        ("Deadline Exceeded", "StatusCode.DEADLINE_EXCEEDED", grpc.StatusCode.DEADLINE_EXCEEDED, "deadline"),
        ("in ensemble 'pixtral', INTERNAL: CUDA out of memory", None, grpc.StatusCode.INTERNAL, "CUDA out of memory"),
    ],
)
def test_triton_errors_map_to_actionable_codes(message, status, code, fragment):
    error = to_api_error(InferenceServerException(message, status=status), "pixtral", "pixtral",
                         ["messages[0].parts[0].image.data", "messages[0].parts[2].image.url"])
    assert error.code == code and fragment in error.message


def test_image_error_names_the_image_field():
    error = to_api_error(InferenceServerException("in ensemble 'pixtral', INVALID_ARGUMENT: image 1: truncated or corrupt PNG data"),
                         "pixtral", "pixtral", ["messages[0].parts[0].image.data", "messages[1].parts[0].image.url"])
    assert error.violations == [("messages[1].parts[0].image.url", "truncated or corrupt PNG data")]


class _Images(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data")
            self.end_headers()
            return
        if self.path == "/slow":
            threading.Event().wait(2)
        body = {"/cat.png": PNG, "/big.png": b"\x89PNG\r\n\x1a\n" + b"0" * 5000, "/text": b"hello"}.get(self.path, PNG)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    with http_host(_Images) as host:
        yield host


def fetch_url(url, host, **settings):
    settings = Settings(api_keys=frozenset({"k"}), image_url_allowlist=(host,), max_image_bytes=1000,
                        image_url_timeout_s=0.5, **settings)
    return asyncio.run(fetch(ImageSource(field="messages[0].parts[0].image.url", url=url), settings))


def test_allowlisted_url_is_fetched(image_host):
    assert fetch_url(f"http://{image_host}/cat.png", image_host) == PNG


@pytest.mark.parametrize("path,message", [
    ("/big.png", "over the limit of 1000 bytes"),
    ("/redirect", "redirect to http://169.254.169.254/latest/meta-data not followed"),
    ("/slow", "took longer than 0.5s"),
    ("/text", "not a supported image file"),
])
def test_fetch_refusals_name_the_field(image_host, path, message):
    with pytest.raises(ApiError) as caught:
        fetch_url(f"http://{image_host}{path}", image_host)
    [(field, description)] = caught.value.violations
    assert field == "messages[0].parts[0].image.url" and message in description


def test_host_off_the_allowlist_is_never_contacted(image_host):
    with pytest.raises(ApiError, match="not on this service's image URL allowlist"):
        fetch_url(f"http://{image_host}/cat.png", "images.internal")
