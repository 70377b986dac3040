"""Brokers: ``bf.brokers.ConcurrentLLMCallBroker(path)`` and the bases to write your own."""

from .base import (
    Broker,
    BrokerFailureBehavior,
    DeferredBroker,
    ImmediateBroker,
    JobFailure,
    JobResult,
)
from .llm_broker import ConcurrentLLMCallBroker, Pacer

__all__ = [
    "Broker", "BrokerFailureBehavior", "ConcurrentLLMCallBroker", "DeferredBroker",
    "ImmediateBroker", "JobFailure", "JobResult", "Pacer",
]
