"""Brokers: ``bf.brokers.ConcurrentLLMCallBroker(path)`` and the bases to write your own."""

from .base import (
    Broker,
    BrokerFailureBehavior,
    ImmediateBroker,
    JobFailure,
    JobResult,
    Outcome,
)
from .llm_broker import ConcurrentLLMCallBroker, Pacer

__all__ = [
    "Broker", "BrokerFailureBehavior", "ConcurrentLLMCallBroker",
    "ImmediateBroker", "JobFailure", "JobResult", "Outcome", "Pacer",
]
