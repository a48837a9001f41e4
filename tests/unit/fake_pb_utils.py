"""A stand-in for `triton_python_backend_utils`, which exists only inside Triton's Python-backend stub
(its types come from the stub's C++): enough of it to run an adapter's `initialize` and `execute`
in-process. Install it with `installed()`; the real server path is covered in tests/integration.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import numpy as np


TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1  # the flag of a decoupled model's last response


class TritonError(Exception):
    INVALID_ARG, INTERNAL, UNAVAILABLE, CANCELLED = "INVALID_ARG", "INTERNAL", "UNAVAILABLE", "CANCELLED"

    def __init__(self, message: str, code: str = INTERNAL):
        super().__init__(message)
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> str:
        return self._code


class Tensor:
    def __init__(self, name: str, value: np.ndarray):
        self._name, self._value = name, value

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._value


class InferenceResponse:
    def __init__(self, output_tensors=(), error: TritonError | None = None):
        self._tensors, self._error = list(output_tensors), error

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def output_tensors(self) -> list[Tensor]:
        return self._tensors


class ReceivedRequest:
    """A request as Triton hands it to `execute`: named tensors (each with its batch dimension) and
    whether the direct caller cancelled it."""

    def __init__(self, tensors: dict[str, np.ndarray], cancelled: bool = False):
        self.tensors, self.cancelled = tensors, cancelled

    def is_cancelled(self) -> bool:
        return self.cancelled


def request_id(value: str) -> np.ndarray:
    """A REQUEST_ID tensor as the ensemble passes it: one UTF-8 string, batch dimension first."""
    return np.array([[value.encode()]], dtype=np.object_)


# What a BLS call (`InferenceRequest.exec` / `async_exec`) answers: the test sets it,
# `handler(model_name, {input name: array}) -> InferenceResponse` (for a decoupled call, its
# responses in order); every call is recorded.
bls_handler = None
bls_calls: list[tuple[str, dict[str, np.ndarray]]] = []


class InferenceRequest:
    def __init__(self, model_name: str, requested_output_names=(), inputs=()):
        self.model_name, self.inputs = model_name, {tensor.name(): tensor.as_numpy() for tensor in inputs}

    def exec(self, decoupled: bool = False):
        bls_calls.append((self.model_name, self.inputs))
        return bls_handler(self.model_name, self.inputs)

    async def async_exec(self) -> InferenceResponse:
        return self.exec()


def get_input_tensor_by_name(request: ReceivedRequest, name: str) -> Tensor | None:
    return Tensor(name, request.tensors[name]) if name in request.tensors else None


def get_output_tensor_by_name(response: InferenceResponse, name: str) -> Tensor | None:
    return next((tensor for tensor in response.output_tensors() if tensor.name() == name), None)


class Metric:
    def __init__(self, labels: dict[str, str]):
        self.labels, self.value = labels, 0.0

    def increment(self, by: float) -> None:
        self.value += by

    def set(self, value: float) -> None:
        self.value = value


class MetricFamily:
    COUNTER, GAUGE = "COUNTER", "GAUGE"
    created: list["MetricFamily"] = []

    def __init__(self, name: str, description: str, kind: str):
        self.name, self.description, self.kind, self.metrics = name, description, kind, []
        MetricFamily.created.append(self)

    def Metric(self, labels: dict[str, str]) -> Metric:  # noqa: N802 (the real API's name)
        metric = Metric(labels)
        self.metrics.append(metric)
        return metric


def metric_values(name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every metric of the families named `name` created so far."""
    return [(metric.labels, metric.value) for family in MetricFamily.created if family.name == name
            for metric in family.metrics]


class Logger:
    @staticmethod
    def log_info(message: str) -> None:
        pass

    log_warn = log_error = log_info


@contextmanager
def installed():
    """This module as `triton_python_backend_utils`, and the adapters imported fresh against it (and
    forgotten after, so no other test sees them bound to the stand-in)."""
    global bls_handler
    adapters = [name for name in sys.modules if name.startswith("vlm_serving.backend")]
    saved = {name: sys.modules.pop(name) for name in adapters}
    sys.modules["triton_python_backend_utils"] = sys.modules[__name__]
    MetricFamily.created.clear()
    bls_calls.clear()
    bls_handler = None
    try:
        yield sys.modules[__name__]
    finally:
        del sys.modules["triton_python_backend_utils"]
        for name in [name for name in sys.modules if name.startswith("vlm_serving.backend")]:
            del sys.modules[name]
        sys.modules.update(saved)
