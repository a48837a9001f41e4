"""All gateway configuration in one typed object, read from the environment once at start."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field


class SettingsError(ValueError):
    pass


REFLECTION_MODES = ("public", "authenticated", "off")
# What a request may carry besides its images: text, tool schemas (32 x 64 KiB), a response format.
REQUEST_TEXT_ALLOWANCE = 4 * 1024 * 1024


def _list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _tls_files(env: dict[str, str]) -> dict[str, str | None]:
    """The TLS file settings, each an existing file, in the pairs they only work in."""
    names = {"tls_cert_file": "VLM_TLS_CERT_FILE", "tls_key_file": "VLM_TLS_KEY_FILE",
             "tls_client_ca_file": "VLM_TLS_CLIENT_CA_FILE", "triton_tls_ca_file": "VLM_TRITON_TLS_CA_FILE",
             "triton_tls_cert_file": "VLM_TRITON_TLS_CERT_FILE", "triton_tls_key_file": "VLM_TRITON_TLS_KEY_FILE"}
    files = {field_name: env.get(variable) or None for field_name, variable in names.items()}
    for field_name, path in files.items():
        if path and not os.path.isfile(path):
            raise SettingsError(f"{names[field_name]}={path!r} is not a file: give the path of a PEM file")
    for cert, key in (("tls_cert_file", "tls_key_file"), ("triton_tls_cert_file", "triton_tls_key_file")):
        if bool(files[cert]) != bool(files[key]):
            raise SettingsError(f"{names[cert]} and {names[key]} go together: set both (a certificate "
                                "chain and its private key) or neither")
    if files["tls_client_ca_file"] and not files["tls_cert_file"]:
        raise SettingsError("VLM_TLS_CLIENT_CA_FILE (mutual TLS) needs TLS: set VLM_TLS_CERT_FILE and "
                            "VLM_TLS_KEY_FILE too")
    if files["triton_tls_cert_file"] and not files["triton_tls_ca_file"]:
        raise SettingsError("VLM_TRITON_TLS_CERT_FILE needs VLM_TRITON_TLS_CA_FILE, the authority that "
                            "signed Triton's certificate (it switches TLS to Triton on)")
    return files


@dataclass(frozen=True)
class Settings:
    """Gateway settings; `from_env` documents the variable behind each field."""

    listen_address: str = "localhost:50051"
    # The OpenAI-compatible HTTP API (gateway/http_api.py), host:port; "off": none.
    http_address: str = "localhost:8080"
    # TLS on both listeners (gateway/tls.py): PEM certificate chain and key files, read again when they
    # change; with tls_client_ca_file, mutual TLS (clients need a certificate that authority signed).
    # None: plain text, for loopback use.
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None
    # TLS to Triton: the authority that signed Triton's certificate (set: TLS on), and this gateway's
    # certificate and key where Triton requires client certificates. Read at start.
    triton_tls_ca_file: str | None = None
    triton_tls_cert_file: str | None = None
    triton_tls_key_file: str | None = None
    # The inference servers: host:port, a comma-separated list of them, or dns:///NAME:PORT (every
    # address NAME resolves to, e.g. a Kubernetes headless Service; re-resolved every triton_resolve_s).
    triton_url: str = "localhost:8001"
    triton_resolve_s: float = 10.0
    # Which server of the pool takes a request (gateway/affinity.py): "affinity" (where its images and
    # prompt were sent before, while that server's requests in flight stay within
    # ceil(affinity_load_factor x the mean), else the least loaded) or "least_loaded".
    routing: str = "affinity"
    affinity_load_factor: float = 1.25
    # Request keys (image hashes, prompt-prefix hashes) remembered per server, least recent out first.
    affinity_keys: int = 4096
    # A stream whose server fails after it began goes on on another server (gateway/migration.py), at
    # most this many times per request (0: never), and only while its deadline leaves migration_reserve_s.
    max_migrations: int = 2
    migration_reserve_s: float = 1.0
    # Public model name -> Triton ensemble (named after its family), or the router "auto".
    models: dict[str, str] = field(default_factory=lambda: {"qwen2.5-vl": "qwen2_5_vl", "pixtral": "pixtral",
                                                            "auto": "auto"})
    # Models this replica must serve to be ready (health SERVING); empty: ready while any model serves.
    required_models: tuple[str, ...] = ()
    api_keys: frozenset[str] = frozenset()
    # Keys allowed to call admin RPCs (model loading); each must also be in api_keys.
    admin_api_keys: frozenset[str] = frozenset()
    # A file of named, hashed keys with scopes and limits (gateway/keys.py; `vlm keys add`), reloaded
    # when it changes; "": the environment's keys only.
    api_keys_file: str = ""
    # Requests in flight per model at which it counts as full (its generation rows plus the queue it
    # may have): beyond it each key gets its fair share only (gateway/quotas.py); 0: no fair sharing.
    model_capacity: int = 0
    metrics_address: str = "127.0.0.1"
    metrics_port: int = 9090
    max_images: int = 16
    max_image_bytes: int = 20 * 1024 * 1024
    max_videos: int = 4
    max_video_bytes: int = 64 * 1024 * 1024
    # All image and video bytes of one request, sent and fetched together.
    max_request_image_bytes: int = 64 * 1024 * 1024
    # All encoded image and video bytes held by the requests in flight together (gateway/media_budget.py):
    # beyond it a request is refused with RESOURCE_EXHAUSTED (retryable). Sized to the gateway's memory.
    max_inflight_media_bytes: int = 1024 * 1024 * 1024
    # Largest request message accepted at all: gRPC refuses a bigger one (RESOURCE_EXHAUSTED) before
    # parsing it, HTTP a bigger body (413, with 4/3 of it for base64). Default (from_env): the image
    # and video budget plus REQUEST_TEXT_ALLOWANCE for text, tools and schemas.
    max_request_bytes: int = 64 * 1024 * 1024 + 4 * 1024 * 1024
    max_prompt_chars: int = 32_768
    max_messages: int = 256
    # Parts (text or image) per message and per request; empty text parts are refused.
    max_parts_per_message: int = 64
    max_parts: int = 256
    max_tokens_limit: int = 4096
    # max_tokens for requests that leave it unset; None: until the answer or the context ends.
    default_max_tokens: int | None = None
    # Requests (HTTP/2 streams) one gRPC connection may have open at once; more wait in the client.
    max_concurrent_streams: int = 100
    image_url_allowlist: tuple[str, ...] = ()
    # Addresses an allowlisted name may resolve to although they are not public (loopback,
    # private, link-local, ...): refused unless inside one of these networks.
    image_url_allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    image_url_timeout_s: float = 10.0
    # Ping period on the connections to Triton: a half-open one fails its requests within twice this.
    triton_keepalive_s: float = 30.0
    # How long a request waits for a connection to a Triton that is down before it is refused
    # (UNAVAILABLE with RetryInfo: it was never sent); reconnects back off to at most half of it.
    triton_connect_timeout_s: float = 2.0
    # Requests with more image and video bytes than this get a Triton stream (and connection) of their own.
    triton_large_request_bytes: int = 1024 * 1024
    # Responses a stream may have waiting for a slow reader before it is failed (RESOURCE_EXHAUSTED).
    max_stream_backlog: int = 1024
    # Server reflection: "public" (no key: grpcurl works out of the box), "authenticated" or "off".
    reflection: str = "public"
    # Applied when the caller sets no deadline, so no request can hold capacity forever.
    default_timeout_s: float = 300.0
    health_poll_s: float = 2.0
    # On SIGTERM, how long requests in flight may take to finish before they are cancelled.
    drain_grace_s: float = 30.0
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Settings":
        env = dict(os.environ if env is None else env)
        defaults = cls()

        def number(name: str, default, kind=int):
            raw = env.get(name)
            if raw is None or raw == "":
                return default
            try:
                return kind(raw)
            except ValueError:
                raise SettingsError(f"{name}={raw!r} is not a valid {kind.__name__}") from None

        models = defaults.models
        if env.get("VLM_MODELS"):
            pairs = [item.split("=", 1) for item in _list(env["VLM_MODELS"])]
            if any(len(pair) != 2 or not all(pair) for pair in pairs):
                raise SettingsError("VLM_MODELS must look like 'qwen2.5-vl=qwen2_5_vl,pixtral=pixtral'")
            models = {name: ensemble for name, ensemble in pairs}
        required = _list(env.get("VLM_REQUIRED_MODELS", ""))
        unknown = [name for name in required if name not in models]
        if unknown:
            raise SettingsError(f"VLM_REQUIRED_MODELS names {', '.join(unknown)}, not served here "
                                f"(VLM_MODELS serves {', '.join(models)})")
        api_keys = frozenset(_list(env.get("VLM_API_KEYS", "")))
        if not api_keys and not env.get("VLM_API_KEYS_FILE"):
            raise SettingsError("VLM_API_KEYS is empty: set at least one API key (e.g. VLM_API_KEYS=dev-local-key) "
                                "or a key file (VLM_API_KEYS_FILE, written by `vlm keys add`)")
        admin_keys = frozenset(_list(env.get("VLM_ADMIN_API_KEYS", "")))
        reflection = env.get("VLM_REFLECTION", defaults.reflection)
        if reflection not in REFLECTION_MODES:
            raise SettingsError(f"VLM_REFLECTION={reflection!r} must be one of {', '.join(REFLECTION_MODES)}")
        try:
            networks = tuple(ipaddress.ip_network(item) for item in _list(env.get("VLM_IMAGE_URL_ALLOWED_NETWORKS", "")))
        except ValueError as exc:
            raise SettingsError(f"VLM_IMAGE_URL_ALLOWED_NETWORKS: {exc} (use CIDRs such as 10.0.0.0/8)") from None
        from gateway.triton_pool import parse_targets

        try:
            parse_targets(env.get("VLM_TRITON_URL", defaults.triton_url))
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        from gateway.affinity import AffinityRouter

        routing = env.get("VLM_ROUTING", defaults.routing)
        load_factor = number("VLM_AFFINITY_LOAD_FACTOR", defaults.affinity_load_factor, float)
        affinity_keys = number("VLM_AFFINITY_KEYS", defaults.affinity_keys)
        try:
            AffinityRouter(routing, load_factor, affinity_keys)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        max_migrations = number("VLM_MAX_MIGRATIONS", defaults.max_migrations)
        migration_reserve_s = number("VLM_MIGRATION_RESERVE_S", defaults.migration_reserve_s, float)
        if max_migrations < 0 or migration_reserve_s < 0:
            raise SettingsError(f"VLM_MAX_MIGRATIONS={max_migrations} and VLM_MIGRATION_RESERVE_S={migration_reserve_s:g} "
                                "must be 0 or more (VLM_MAX_MIGRATIONS=0 turns stream migration off)")
        tls = _tls_files(env)
        image_budget = number("VLM_MAX_REQUEST_IMAGE_BYTES", defaults.max_request_image_bytes)
        request_bytes = number("VLM_MAX_REQUEST_BYTES", image_budget + REQUEST_TEXT_ALLOWANCE)
        inflight_media = number("VLM_MAX_INFLIGHT_MEDIA_BYTES", defaults.max_inflight_media_bytes)
        # The most one request may hold: its HTTP body (base64) and the URLs it fetches.
        largest_request = request_bytes * 4 // 3 + image_budget
        if inflight_media < largest_request:
            raise SettingsError(f"VLM_MAX_INFLIGHT_MEDIA_BYTES={inflight_media} is less than one request may hold "
                                f"({largest_request} bytes: 4/3 of VLM_MAX_REQUEST_BYTES for an HTTP body plus "
                                "VLM_MAX_REQUEST_IMAGE_BYTES fetched); raise it or lower those")
        return cls(
            listen_address=env.get("VLM_LISTEN_ADDRESS", defaults.listen_address),
            http_address=env.get("VLM_HTTP_ADDRESS", defaults.http_address),
            **tls,
            triton_url=env.get("VLM_TRITON_URL", defaults.triton_url),
            triton_resolve_s=number("VLM_TRITON_RESOLVE_S", defaults.triton_resolve_s, float),
            routing=routing,
            affinity_load_factor=load_factor,
            affinity_keys=affinity_keys,
            max_migrations=max_migrations,
            migration_reserve_s=migration_reserve_s,
            models=models,
            required_models=required,
            api_keys=api_keys | admin_keys,
            admin_api_keys=admin_keys,
            api_keys_file=env.get("VLM_API_KEYS_FILE", ""),
            model_capacity=number("VLM_MODEL_CAPACITY", defaults.model_capacity),
            metrics_address=env.get("VLM_METRICS_ADDRESS", defaults.metrics_address),
            metrics_port=number("VLM_METRICS_PORT", defaults.metrics_port),
            max_images=number("VLM_MAX_IMAGES", defaults.max_images),
            max_image_bytes=number("VLM_MAX_IMAGE_BYTES", defaults.max_image_bytes),
            max_videos=number("VLM_MAX_VIDEOS", defaults.max_videos),
            max_video_bytes=number("VLM_MAX_VIDEO_BYTES", defaults.max_video_bytes),
            max_request_image_bytes=image_budget,
            max_request_bytes=request_bytes,
            max_inflight_media_bytes=inflight_media,
            max_prompt_chars=number("VLM_MAX_PROMPT_CHARS", defaults.max_prompt_chars),
            max_messages=number("VLM_MAX_MESSAGES", defaults.max_messages),
            max_parts_per_message=number("VLM_MAX_PARTS_PER_MESSAGE", defaults.max_parts_per_message),
            max_parts=number("VLM_MAX_PARTS", defaults.max_parts),
            max_tokens_limit=number("VLM_MAX_TOKENS_LIMIT", defaults.max_tokens_limit),
            default_max_tokens=number("VLM_DEFAULT_MAX_TOKENS", defaults.default_max_tokens) or None,
            max_concurrent_streams=number("VLM_MAX_CONCURRENT_STREAMS", defaults.max_concurrent_streams),
            image_url_allowlist=_list(env.get("VLM_IMAGE_URL_ALLOWLIST", "")),
            image_url_allowed_networks=networks,
            image_url_timeout_s=number("VLM_IMAGE_URL_TIMEOUT_S", defaults.image_url_timeout_s, float),
            triton_keepalive_s=number("VLM_TRITON_KEEPALIVE_S", defaults.triton_keepalive_s, float),
            triton_connect_timeout_s=number("VLM_TRITON_CONNECT_TIMEOUT_S", defaults.triton_connect_timeout_s, float),
            triton_large_request_bytes=number("VLM_TRITON_LARGE_REQUEST_BYTES", defaults.triton_large_request_bytes),
            max_stream_backlog=number("VLM_MAX_STREAM_BACKLOG", defaults.max_stream_backlog),
            reflection=reflection,
            default_timeout_s=number("VLM_DEFAULT_TIMEOUT_S", defaults.default_timeout_s, float),
            health_poll_s=number("VLM_HEALTH_POLL_S", defaults.health_poll_s, float),
            drain_grace_s=number("VLM_DRAIN_GRACE_S", defaults.drain_grace_s, float),
            log_level=env.get("VLM_LOG_LEVEL", defaults.log_level),
        )

    @property
    def max_http_body_bytes(self) -> int:
        """The largest HTTP request body: images and videos travel there as base64, 4/3 of their bytes."""
        return self.max_request_bytes * 4 // 3

    def family_of(self, model: str) -> str:
        return self.models[model]
