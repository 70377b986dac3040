"""Brokers: ``bf.brokers.ConcurrentLLMCallBroker(path)`` and the bases to write your own."""

from .base import (
    Broker,
    BrokerFailureBehavior,
    ImmediateBroker,
    JobFailure,
    JobResult,
    Outcome,
)
from .batch_llm import BatchLLMCallBroker
from .deferred import DeferredBroker, Poll, Submission
from .llm_broker import ConcurrentLLMCallBroker, Pacer

__all__ = [
    "BatchLLMCallBroker", "Broker", "BrokerFailureBehavior", "ConcurrentLLMCallBroker",
    "DeferredBroker", "ImmediateBroker", "JobFailure", "JobResult", "Outcome", "Pacer", "Poll",
    "Submission",
]
