"""Triton adapter for `vlm_serving.encoding.encoder.embed_batch`: each request's image embeddings, from the
cache or from the family's encoder model (a BLS call per request with unseen images, all in
flight together so that the encoder's dynamic batcher joins them). A request whose caller has gone
(REQUEST_ID on the cancellation board) is answered with an error at once, its images never encoded."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from vlm_serving.backend.cancel_model import AbandonedRequests
from vlm_serving.backend.common import error_response, image_tensors, model_parameters, read_images, read_request_id
from vlm_serving.encoding.encoder import EmbeddingCache, EncoderChanges, embed_batch
from vlm_serving.encoding.encoder_inputs import split_per_image
from vlm_serving.tracing import ModelTracing


class TritonPythonModel:
    def initialize(self, args):
        parameters = model_parameters(args)
        self.family = parameters["family"]
        self.encoder_model = parameters["encoder_model"]
        self.cache = EmbeddingCache(int(parameters["cache_bytes"]))
        self.encoder_changes = EncoderChanges()
        self.encoder_marker = ""
        # The identity (model/version/variant/weights) the encoder reported last; cache keys carry it.
        self.identity = ""
        # Served on Triton's metrics endpoint. A metric family must outlive its metrics: both are kept.
        self.metric_families = []
        self.hits = self._metric("vlm_encoder_cache_hits_total", "Images whose embeddings came from the cache")
        self.misses = self._metric("vlm_encoder_cache_misses_total", "Images sent to the vision encoder")
        self.evictions = self._metric("vlm_encoder_cache_evictions_total", "Embeddings evicted to stay within the cache size")
        self.cached_bytes = self._metric("vlm_encoder_cache_bytes", "Bytes of image embeddings in the cache", gauge=True)
        self.counted = (0, 0, 0)
        self.abandoned = AbandonedRequests(args)
        self.tracing = ModelTracing()

    def _metric(self, name: str, description: str, gauge: bool = False):
        kind = pb_utils.MetricFamily.GAUGE if gauge else pb_utils.MetricFamily.COUNTER
        family = pb_utils.MetricFamily(name=name, description=description, kind=kind)
        self.metric_families.append(family)
        return family.Metric(labels={"model": self.encoder_model})

    async def _encode(self, images):
        request = pb_utils.InferenceRequest(
            model_name=self.encoder_model,
            requested_output_names=["IMAGE_EMBEDS", "ENCODER_IDENTITY"],
            inputs=image_tensors(images, self.family),
        )
        response = await request.async_exec()
        if response.has_error():
            raise RuntimeError(f"{self.encoder_model}: {response.error().message()}")
        embeddings = pb_utils.get_output_tensor_by_name(response, "IMAGE_EMBEDS").as_numpy()[0]
        identity = pb_utils.get_output_tensor_by_name(response, "ENCODER_IDENTITY").as_numpy().reshape(-1)[0]
        self.identity = identity.decode()
        return split_per_image(embeddings, images, self.family), self.identity

    async def execute(self, requests):
        marker = self.encoder_changes.current(self.encoder_model)
        if marker != self.encoder_marker:  # the encoder was loaded or unloaded since the last batch
            self.cache.clear()
            self.encoder_marker, self.identity = marker, ""
        responses: list = [None] * len(requests)
        batch, indices = [], []
        for index, request in enumerate(requests):
            responses[index] = self.abandoned.response_if_abandoned(request)
            if responses[index] is not None:
                continue
            try:
                batch.append(read_images(request, self.family))
                indices.append(index)
            except (ValueError, IndexError) as exc:
                responses[index] = error_response(exc)
        spans = [self.tracing.start("encoder cache", self.tracing.context(requests[index]),
                                    read_request_id(requests[index]), **{"vlm.images": len(images)})
                 for index, images in zip(indices, batch)]
        hits: list[int] = []
        answers = await embed_batch(batch, self.cache, self.identity, self._encode, hits)
        for span, images, found in zip(spans, batch, hits):
            span.set_attributes({"vlm.cache.hits": found, "vlm.cache.misses": len(images) - found})
            span.end()
        for index, answer in zip(indices, answers):
            if isinstance(answer, Exception):
                # Preprocessing made the encoder's inputs: whatever fails here is not the caller's fault.
                responses[index] = error_response(answer, caller_error=False)
            else:
                responses[index] = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("IMAGE_EMBEDS", np.ascontiguousarray(answer)[None])]
                )
        self._export_metrics()
        return responses

    def finalize(self):
        self.tracing.shutdown()

    def _export_metrics(self) -> None:
        stats = self.cache.stats
        now = (stats.hits, stats.misses, stats.evictions)
        for metric, before, after in zip((self.hits, self.misses, self.evictions), self.counted, now):
            if after > before:
                metric.increment(after - before)
        self.counted = now
        self.cached_bytes.set(self.cache.bytes)
