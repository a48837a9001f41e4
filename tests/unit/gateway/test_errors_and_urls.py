import asyncio
import http.server
import ipaddress
import threading

import grpc
import pytest
from grpc_status import rpc_status
from google.rpc import error_details_pb2
from tritonclient.utils import InferenceServerException

from gateway.errors import ApiError, invalid_argument
from gateway.image_urls import fetch_all
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
        ("[request id: r1.9f3a] Exceeds maximum queue size", None, grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full"),
        ("Request for unknown model: 'pixtral' is not found", None, grpc.StatusCode.UNAVAILABLE, "model 'pixtral' is not ready"),
        ("in ensemble 'pixtral', INVALID_ARGUMENT: image 1: truncated or corrupt PNG data", None, grpc.StatusCode.INVALID_ARGUMENT, "truncated"),
        ("in ensemble 'pixtral', INVALID_ARGUMENT: messages: the model's chat template refused them", None, grpc.StatusCode.INVALID_ARGUMENT, "chat template"),
        ("Deadline Exceeded", "StatusCode.DEADLINE_EXCEEDED", grpc.StatusCode.DEADLINE_EXCEEDED, "deadline"),
        ("in ensemble 'pixtral', INTERNAL: CUDA out of memory", None, grpc.StatusCode.INTERNAL, "CUDA out of memory"),
        # Not retryable because a word appears in the text: only Triton's own anchored messages are.
        ("in ensemble 'pixtral', INTERNAL: checkpoint file not found", None, grpc.StatusCode.INTERNAL, "file not found"),
        ("in ensemble 'pixtral', Stub process 'x' is unavailable", None, grpc.StatusCode.INTERNAL, "unavailable"),
        # A Python model's process died: Triton does not restart it (tests/integration/test_stub_chaos.py).
        ("in ensemble 'pixtral', Stub process 'pixtral_preprocess_0_1' is not healthy.", None, grpc.StatusCode.UNAVAILABLE,
         "unload and load pixtral_preprocess"),
        ("Request for unknown model: 'pixtral' has no available versions", None, grpc.StatusCode.UNAVAILABLE, "not ready"),
        ("in ensemble 'pixtral', Request for unknown model: 'pixtral_generate' version 2 is not at ready state", None,
         grpc.StatusCode.UNAVAILABLE, "not ready"),
        ("the stream to Triton failed: UNAVAILABLE: Stream removed", "StatusCode.UNAVAILABLE", grpc.StatusCode.UNAVAILABLE, "retry"),
    ],
)
def test_triton_errors_map_to_actionable_codes(message, status, code, fragment):
    error = to_api_error(InferenceServerException(message, status=status), "pixtral",
                         ["messages[0].parts[0].image.data", "messages[0].parts[2].image.url"])
    assert error.code == code and fragment in error.message


def test_image_error_names_the_image_field():
    error = to_api_error(InferenceServerException("in ensemble 'pixtral', INVALID_ARGUMENT: image 1: truncated or corrupt PNG data"),
                         "pixtral", ["messages[0].parts[0].image.data", "messages[1].parts[0].image.url"])
    assert error.violations == [("messages[1].parts[0].image.url", "truncated or corrupt PNG data")]


class _Images(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    served = 0
    both_in_flight = threading.Barrier(2, timeout=3)
    drip_ended = threading.Event()

    def do_GET(self):
        _Images.served += 1
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path == "/slow":
            threading.Event().wait(2)
        if self.path == "/drip":  # headers at once, then a byte every 0.1 s: never idle long enough to time out
            self.send_response(200)
            self.send_header("Content-Length", "900")
            self.end_headers()
            try:
                for _ in range(900):
                    self.wfile.write(b"\x89")
                    self.wfile.flush()
                    threading.Event().wait(0.1)
            except OSError:
                pass
            finally:
                _Images.drip_ended.set()
            return
        if self.path.startswith("/together"):  # answers only once two requests are in flight at once
            try:
                _Images.both_in_flight.wait()
            except threading.BrokenBarrierError:
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = {"/cat.png": PNG, "/big.png": b"\x89PNG\r\n\x1a\n" + b"0" * 5000, "/text": b"hello"}.get(self.path, PNG)
        self.send_response(404 if self.path == "/missing" else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    with http_host(_Images) as host:
        yield host


LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)
FIELD = "messages[0].parts[0].image.url"


def url_settings(host, **changes):
    return Settings(**{"api_keys": frozenset({"k"}), "image_url_allowlist": (host,), "max_image_bytes": 1000,
                       "image_url_timeout_s": 0.5, "image_url_allowed_networks": LOOPBACK, **changes})


def fetch_urls(urls, host, **changes):
    sources = [ImageSource(field=f"messages[0].parts[{i}].image.url", url=url) for i, url in enumerate(urls)]
    return asyncio.run(fetch_all(sources, url_settings(host, **changes)))


def test_allowlisted_url_is_fetched(image_host):
    assert fetch_urls([f"http://{image_host}/cat.png"], image_host) == [PNG]


@pytest.mark.parametrize("path,message", [
    ("/big.png", "over the limit of 1000 bytes"),
    ("/redirect", "redirect to http://169.254.169.254/latest/meta-data not followed"),
    ("/slow", "took longer than 0.5s"),
    ("/text", "not a supported image file"),
    ("/missing", "HTTP 404"),
])
def test_fetch_refusals_name_the_field(image_host, path, message):
    with pytest.raises(ApiError) as caught:
        fetch_urls([f"http://{image_host}{path}"], image_host)
    [(field, description)] = caught.value.violations
    assert field == FIELD and message in description, description


def test_a_dripping_host_is_cut_off_at_the_timeout_and_its_connection_closed(image_host):
    _Images.drip_ended.clear()
    with pytest.raises(ApiError, match="took longer than 0.5s"):
        fetch_urls([f"http://{image_host}/drip"], image_host, max_image_bytes=5000)
    # No download goes on behind the caller's back: the server's writes fail soon after.
    assert _Images.drip_ended.wait(3)


def test_a_requests_urls_are_fetched_concurrently(image_host):
    _Images.both_in_flight.reset()
    images = fetch_urls([f"http://{image_host}/together/1", f"http://{image_host}/together/2"], image_host,
                        image_url_timeout_s=5)
    assert images == [PNG, PNG]


def test_all_images_of_a_request_are_bounded_together(image_host):
    with pytest.raises(ApiError) as caught:
        fetch_urls([f"http://{image_host}/cat.png"] * 3, image_host, max_request_image_bytes=len(PNG) * 2 + 10)
    assert caught.value.violations[0][0] == "messages" and "add up to more than" in caught.value.message


@pytest.mark.parametrize("host_of", [lambda port: f"localhost:{port}", lambda port: f"127.0.0.1:{port}"])
def test_loopback_is_refused_unless_its_network_is_allowed(image_host, host_of):
    host = host_of(image_host.rsplit(":", 1)[1])
    with pytest.raises(ApiError) as caught:
        fetch_urls([f"http://{host}/cat.png"], host, image_url_allowed_networks=())
    [(field, description)] = caught.value.violations
    assert field == FIELD and "resolves to 127.0.0.1, a loopback address" in description, description


@pytest.mark.parametrize("address,refused", [
    ("169.254.169.254", "link-local"), ("10.1.2.3", "private"), ("192.168.0.1", "private"),
    ("100.100.100.200", "non-public"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"),
    ("fd00:ec2::254", "private"), ("0.0.0.0", "private"), ("8.8.8.8", None), ("2606:4700::1111", None),
    # Private IPv4 addresses inside IPv6 forms that reach them: NAT64, 6to4, IPv4-compatible, Teredo.
    ("64:ff9b::a9fe:a9fe", "link-local"), ("64:ff9b::7f00:1", "loopback"), ("64:ff9b::808:808", None),
    ("64:ff9b:1::a00:1", "non-public"), ("2002:a9fe:a9fe::1", "link-local"), ("2002:c0a8:1::", "private"),
    ("2002:808:808::1", None), ("::169.254.169.254", "link-local"), ("::10.0.0.1", "private"),
    ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "private"),  # Teredo: client 10.0.0.1
])
def test_only_public_addresses_are_reachable(address, refused):
    from gateway.image_urls import address_problem

    problem = address_problem(ipaddress.ip_address(address), Settings(api_keys=frozenset({"k"})))
    assert (problem is None) if refused is None else (f"a {refused}" in problem), problem


@pytest.mark.parametrize("url,message", [
    ("http://[::1/x", "not a valid URL"),
    ("http://images.example:abc/", "not a valid URL"),
    ("http://images.example:8080/a.png", "port 8080 of 'images.example' is not on"),
    ("https://images.example:80/a.png", "port 80 of 'images.example' is not on"),
    ("http:///a.png", "names no host"),
])
def test_malformed_urls_and_other_ports_are_invalid_arguments_naming_the_field(url, message):
    from vlm.v1 import vlm_pb2

    from gateway.validation import validate

    part = vlm_pb2.Part(image=vlm_pb2.Image(url=url))
    proto = vlm_pb2.GenerateRequest(model="pixtral", messages=[vlm_pb2.Message(role="user", parts=[part])])
    with pytest.raises(ApiError) as caught:
        validate(proto, Settings(api_keys=frozenset({"k"}), image_url_allowlist=("images.example",)), False)
    [(field, description)] = caught.value.violations
    assert field == FIELD and message in description, description


def test_host_off_the_allowlist_is_never_contacted(image_host):
    before = _Images.served
    with pytest.raises(ApiError, match="not on this service's image URL allowlist"):
        fetch_urls([f"http://{image_host}/cat.png"], "images.internal")
    fetch_urls([f"http://{image_host}/cat.png"], image_host)  # the host counts what reaches it
    assert _Images.served == before + 1


def test_only_refusals_that_did_no_work_carry_retry_info():
    from grpc_status import rpc_status

    def retry_info(message, status=None):
        error = to_api_error(InferenceServerException(message, status=status), "pixtral", [])
        decoded = rpc_status.status_pb2.Status.FromString(error.to_status().trailing_metadata[0][1])
        return error.code, [d for d in decoded.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]

    assert retry_info("[request id: r] Exceeds maximum queue size")[1]
    assert retry_info("Request for unknown model: 'pixtral' is not found")[1]
    # May have run (the stream broke mid-way): UNAVAILABLE, but never retried by our clients.
    code, details = retry_info("the stream to Triton failed: UNAVAILABLE", "StatusCode.UNAVAILABLE")
    assert code == grpc.StatusCode.UNAVAILABLE and not details
