"""LLMBrokerResource: the broker as a Dagster resource (config plus lifecycle, nothing more)."""

from __future__ import annotations

from typing import Any

import dagster as dg
from pydantic import Field, PrivateAttr

from ..brokers.llm_broker import ConcurrentLLMCallBroker

__all__ = ["LLMBrokerResource"]


class LLMBrokerResource(dg.ConfigurableResource):
    """Builds a :class:`ConcurrentLLMCallBroker` for each run (and each step process).

    Examples:
        .. code-block:: python

            import dagster as dg
            from batchfactory_dagster.dagster import LLMBrokerResource

            defs = dg.Definitions(
                assets=[...],
                resources={"llm_broker": LLMBrokerResource(
                    cache_path="data/llm_broker.jsonl",
                    openai_api_key=dg.EnvVar("OPENAI_API_KEY"),
                    rpm=500)},
            )
    """

    cache_path: str = Field(description="Ledger (JSONL) of paid-for answers, keyed by request "
                            "hash. Shared by every run, step and process; put it on shared "
                            "storage when steps run on several machines.")
    concurrency: int = Field(default=64, gt=0, description="Requests in flight at once per "
                             "step process.")
    rpm: float | None = Field(default=None, gt=0, description="Requests per minute for this "
                              "process. Under the multiprocess executor divide the provider's "
                              "limit by the number of step processes that can run at once.")
    tpm: float | None = Field(default=None, gt=0, description="Tokens per minute for this "
                              "process (estimated before a call, corrected with usage).")
    max_attempts: int = Field(default=5, gt=0, description="Attempts per request for "
                              "transient errors (429, 5xx, timeouts, resets).")
    timeout: float = Field(default=120.0, gt=0, description="Seconds to wait for one answer.")
    openai_api_key: str | None = Field(default=None, description="Key for the 'openai' "
                                       "provider; pass dg.EnvVar('OPENAI_API_KEY'). Unset: the "
                                       "OPENAI_API_KEY environment variable is used.")
    api_keys: dict[str, str] = Field(default_factory=dict, description="Keys of other "
                                     "providers by provider name (use dg.EnvVar values).")

    _broker: ConcurrentLLMCallBroker | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._broker = self.make_broker()

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._broker is not None:
            self._broker.close()
            self._broker = None

    def make_broker(self) -> ConcurrentLLMCallBroker:
        keys = dict(self.api_keys)
        if self.openai_api_key:
            keys["openai"] = self.openai_api_key
        return ConcurrentLLMCallBroker(self.cache_path, concurrency=self.concurrency,
                                       rpm=self.rpm, tpm=self.tpm,
                                       max_attempts=self.max_attempts, timeout=self.timeout,
                                       api_keys=keys)

    def get_broker(self) -> ConcurrentLLMCallBroker:
        if self._broker is None:  # used outside a run (tests, notebooks)
            self._broker = self.make_broker()
        return self._broker

    def __repr_args__(self) -> Any:  # keys never reach a repr or a log
        for name, value in super().__repr_args__():
            if name in ("openai_api_key", "api_keys") and value:
                value = "***" if isinstance(value, str) else {k: "***" for k in value}
            yield name, value
