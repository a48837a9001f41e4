"""Stream migration: a streamed answer whose Triton server fails goes on on another server.

Each response of a family's ensemble carries the token ids of its text (`ResponseChunk.token_ids`).
`Answer` keeps those the caller has received. When the server fails after delivering some, the
pool (`TritonPool.generate`) sends the same request to another server with them as its
CONTINUATION: that server prefills the prompt and the delivered tokens, and goes on where the
first one stopped (`vlm_serving.generation.batch.RowProgress.resume`):
- its text assembler is fed the delivered tokens first, so its first delta starts exactly where
  the caller's text ends (text held back there, an incomplete character or the start of a stop
  sequence, is held back here too: nothing is sent twice or lost);
- a response format's grammar accepts the delivered tokens first; penalties, max_tokens and
  usage count them as the answer's (completion_tokens is the whole answer's);
- greedy answers are the uninterrupted run's; a seeded sample makes the draws it made for the
  delivered tokens and continues with the same random stream (the same tokens where the servers
  compute the same logits); an unseeded sample continues validly with a fresh seed. The final
  confidence averages the tokens the last server chose (the delivered ones' are not known there).

Bounded by `MigrationPolicy`: at most `max_migrations` per request, and none once the request's
deadline leaves less than `reserve_s` (the continuation prefills the prompt again): then the
caller gets UNAVAILABLE naming why, as before migration existed. Model "auto" streams only once
its route is decided (the answering family, the reason, the attempts before it: on every response),
so its stream goes on on another server in that family's own ensemble, and the final response gets
the route model auto would have given, the answering family's attempt added.
A whole (unary) answer arrives in one response: it is retried whole when its server fails, since
nothing was delivered. Each migration decision is counted in `vlm_stream_migrations_total{model,
outcome}` and logged.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import inspect
from dataclasses import dataclass

import grpc
from tritonclient.utils import InferenceServerException

from gateway.triton_backend import TritonBackend
from vlm_serving.ensemble_client import ResponseChunk
from vlm_serving.pipelines import ROUTER
from vlm_serving.routing import Attempt, Reply

# When the request being served must be answered (the event loop's clock), set where its deadline is.
deadline_var: contextvars.ContextVar[float | None] = contextvars.ContextVar("request_deadline", default=None)

# vlm_stream_migrations_total's outcomes.
MIGRATED = "migrated"  # continued on another server
LIMIT = "refused_limit"  # the request had been migrated max_migrations times already
DEADLINE = "refused_deadline"  # its deadline left less than reserve_s
ROUTER_MODEL = "refused_router"  # model auto's responses did not say their route
NO_SERVER = "no_server"  # no other server could take it


@dataclass(frozen=True)
class MigrationPolicy:
    """How far the pool goes to save a streamed answer whose server failed (VLM_MAX_MIGRATIONS,
    VLM_MIGRATION_RESERVE_S)."""

    max_migrations: int = 2
    reserve_s: float = 1.0


class Answer:
    """One request's call (TritonBackend.generate's arguments) and what its caller has received."""

    def __init__(self, ensemble: str, args: tuple, kwargs: dict):
        self.call = (ensemble, *args), kwargs  # as given: every request makes one, few migrate
        self.ensemble = ensemble
        self.token_ids: list[int] = []
        self.delivered = False
        self.migrations = 0
        # Model auto: the route its responses gave (the answering family, the reason, the attempts
        # before this family's); a continuation goes to that family's own ensemble and keeps it.
        self.route: dict = {}

    @property
    def target(self) -> str:
        """The ensemble that goes on with the answer: model auto's answering family once it streams."""
        return self.route["family"] if self.ensemble == ROUTER and self.delivered and self.route else self.ensemble

    def received(self, chunk: ResponseChunk) -> ResponseChunk:
        """Note a chunk the caller is given."""
        if self.ensemble == ROUTER:
            self._keep_route(chunk)
        self.delivered = True
        self.token_ids += chunk.token_ids
        return chunk

    def _keep_route(self, chunk: ResponseChunk) -> None:
        """Model auto's chunks say their route; a family ensemble's (after a migration) get the one kept,
        the final one with the answering family's attempt added as model auto would add it."""
        if chunk.route:
            self.route = chunk.route
            return
        if not self.route:
            return
        chunk.route = dict(self.route)
        if chunk.finished:
            answered = Attempt.of(self.route["family"], Reply(finished=True, confidence=chunk.confidence,
                                                              completion_tokens=chunk.completion_tokens,
                                                              model_version=chunk.model_version))
            chunk.route["attempts"] = [*self.route.get("attempts", ()), answered.__dict__]

    def refusal(self, policy: MigrationPolicy) -> tuple[str, str] | None:
        """(outcome, why) when the answer may not move to another server; None when it may."""
        if self.ensemble == ROUTER and "reason" not in self.route:
            return ROUTER_MODEL, ("model auto's responses did not say their route (a server older than this gateway): "
                                  "its answer is not continued on another server")
        if self.migrations >= policy.max_migrations:
            return LIMIT, f"it was continued on another server {self.migrations} time(s) already, the most allowed"
        deadline = deadline_var.get()
        if deadline is not None:
            left = deadline - asyncio.get_running_loop().time()
            if left < policy.reserve_s:
                return DEADLINE, (f"its deadline leaves {max(left, 0.0):.2f}s, less than the {policy.reserve_s:g}s a "
                                  "continuation on another server is given")
        return None

    def continuation(self) -> tuple[tuple, dict]:
        """TritonBackend.generate's arguments for the next server: the call, after what was delivered
        (model auto's: to its answering family's ensemble, which takes no routing options)."""
        args, kwargs = self.call
        if self.ensemble != ROUTER:
            return args, {**kwargs, "continuation": list(self.token_ids)}
        arguments = inspect.signature(TritonBackend.generate).bind(None, *args, **kwargs).arguments
        del arguments["self"]
        arguments.update(ensemble=self.target, routing=None, continuation=list(self.token_ids))
        return (), arguments


def incomplete(address: str, error: str, why: str) -> InferenceServerException:
    """What the caller of an answer that was not continued gets: UNAVAILABLE, saying why."""
    return InferenceServerException(f"the inference server at {address} failed after the answer had begun ({error}); "
                                    f"not continued on another server: {why}; the answer is incomplete",
                                    status=str(grpc.StatusCode.UNAVAILABLE))


class MigrationCounts:
    """vlm_stream_migrations_total{model, outcome}: a Prometheus collector of the pool's decisions."""

    def __init__(self) -> None:
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def count(self, model: str, outcome: str) -> None:
        self.counts[(model, outcome)] += 1

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily("vlm_stream_migrations", "Streamed answers whose inference server failed after "
                                     "they had begun, by model and what was done: migrated (continued on another "
                                     "server), refused_limit, refused_deadline, refused_router, no_server",
                                     labels=["model", "outcome"])
        for (model, outcome), count in sorted(self.counts.items()):
            family.add_metric([model, outcome], count)
        yield family
