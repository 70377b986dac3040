"""Providers: where a "model@provider" string sends its requests.

Built in: ``openai`` (OPENAI_API_KEY, OPENAI_BASE_URL), a few OpenAI-compatible hosts, and the
offline ``local`` provider that answers deterministically with labelled synthetic text, needs no
key and no network. Register any other OpenAI-compatible endpoint (vLLM, Ollama, Together...)
with :func:`register_provider`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from ..core.errors import ConfigError

__all__ = [
    "OFFLINE_ENV", "Provider", "get_provider", "list_providers", "offline_mode", "offline_unless_key",
    "parse_model",
    "register_provider",
]

OFFLINE_ENV = "BATCHFACTORY_OFFLINE"


@dataclass(frozen=True)
class Provider:
    """An OpenAI-compatible endpoint. The key is read from ``api_key_env`` when a call is made;
    it is never stored on this object, so it cannot leak through a repr or a ledger."""

    name: str
    base_url: str | None = None  # None: the openai client's default (or OPENAI_BASE_URL)
    api_key_env: str | None = None
    base_url_env: str | None = None
    offline: bool = False  # True: answered in-process by the synthetic model

    def resolve_base_url(self) -> str | None:
        if self.base_url_env and os.environ.get(self.base_url_env):
            return os.environ[self.base_url_env]
        return self.base_url

    def api_key(self) -> str:
        if self.offline:
            return "offline"
        key = os.environ.get(self.api_key_env or "", "")
        if key:
            return key
        if self.api_key_env is None:
            return "none"  # e.g. a local vLLM/Ollama server that takes any key
        raise ConfigError(
            f"provider {self.name!r} needs an API key in the environment variable "
            f"{self.api_key_env}, which is not set. Set it (export {self.api_key_env}=...), "
            f"or run offline with model '<name>@local' or {OFFLINE_ENV}=1 for labelled "
            "synthetic answers")


_PROVIDERS: dict[str, Provider] = {}


def register_provider(name: str, base_url: str | None = None, api_key_env: str | None = None,
                      *, base_url_env: str | None = None, offline: bool = False) -> Provider:
    """Add (or replace) a provider: ``register_provider("vllm", "http://gpu:8000/v1")``."""
    if not name or "@" in name:
        raise ConfigError(f"provider name {name!r} must be non-empty and contain no '@'")
    provider = Provider(name, base_url, api_key_env, base_url_env, offline)
    _PROVIDERS[name] = provider
    return provider


register_provider("openai", None, "OPENAI_API_KEY", base_url_env="OPENAI_BASE_URL")
register_provider("local", offline=True)
register_provider("deepseek", "https://api.deepseek.com/v1", "DEEPSEEK_API_KEY")
register_provider("together", "https://api.together.xyz/v1", "TOGETHER_API_KEY")
register_provider("lambda", "https://api.lambdalabs.com/v1", "LAMBDA_API_KEY")
register_provider("openrouter", "https://openrouter.ai/api/v1", "OPENROUTER_API_KEY")
register_provider("ollama", "http://127.0.0.1:11434/v1", None)
register_provider("vllm", "http://127.0.0.1:8000/v1", None, base_url_env="VLLM_BASE_URL")


def list_providers() -> list[str]:
    return sorted(_PROVIDERS)


def offline_mode() -> bool:
    """True when BATCHFACTORY_OFFLINE is set: every provider is answered by ``local``."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def offline_unless_key(env: str = "OPENAI_API_KEY", *, quiet: bool = False) -> bool:
    """Turn on offline mode when ``env`` holds no key; returns True when running offline.

    What the examples and ``definitions.py`` call first, so they work on a fresh machine.
    """
    if not os.environ.get(env):
        os.environ[OFFLINE_ENV] = "1"
    offline = offline_mode()
    if offline and not quiet:
        print(f"{OFFLINE_ENV}=1 (no {env}): answers are synthetic, labelled [synthetic], made "
              f"offline at no cost; set {env} for real answers.", file=sys.stderr)
    return offline


def parse_model(model: str) -> tuple[str, str]:
    """``"gpt-4o-mini@openai"`` -> ``("gpt-4o-mini", "openai")``; the provider must be known."""
    if not isinstance(model, str) or model.count("@") < 1:
        raise ConfigError(
            f"model {model!r} is not of the form 'name@provider' (e.g. 'gpt-4o-mini@openai' or "
            f"'gpt-4o-mini@local' offline); known providers: {', '.join(list_providers())}")
    name, _, provider = model.rpartition("@")
    if not name or not provider:
        raise ConfigError(f"model {model!r} has an empty name or provider; write 'name@provider'")
    get_provider(provider)
    return name, provider


def get_provider(name: str) -> Provider:
    try:
        return _PROVIDERS[name]
    except KeyError:
        raise ConfigError(
            f"unknown provider {name!r}; known: {', '.join(list_providers())}. Register an "
            f"OpenAI-compatible endpoint with register_provider({name!r}, base_url, "
            "api_key_env)") from None
