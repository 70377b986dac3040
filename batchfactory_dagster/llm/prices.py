"""Prices in USD per million tokens: data that users can override.

List prices for synchronous calls as the authors last knew them; they change, so check yours and
override with :func:`set_price`. Batch APIs bill ``BATCH_DISCOUNT`` of these.
"""

from __future__ import annotations

import warnings

__all__ = ["BATCH_DISCOUNT", "Price", "compute_cost", "get_price", "set_price"]

Price = tuple[float, float]  # (input, output) USD per 1M tokens

BATCH_DISCOUNT = 0.5

_PRICES: dict[str, Price] = {
    "gpt-4o-mini@openai": (0.15, 0.60),
    "gpt-4o@openai": (2.50, 10.00),
    "gpt-4.1@openai": (2.00, 8.00),
    "gpt-4.1-mini@openai": (0.40, 1.60),
    "gpt-4.1-nano@openai": (0.10, 0.40),
    "gpt-5@openai": (1.25, 10.00),
    "gpt-5-mini@openai": (0.25, 2.00),
    "gpt-5-nano@openai": (0.05, 0.40),
    "o3-mini@openai": (1.10, 4.40),
    "o4-mini@openai": (1.10, 4.40),
    "deepseek-chat@deepseek": (0.27, 1.10),
    "deepseek-reasoner@deepseek": (0.55, 2.19),
}
_warned: set[str] = set()


def set_price(model: str, input_per_million: float, output_per_million: float) -> None:
    """Set or override the price of ``"name@provider"`` (USD per 1M tokens)."""
    if input_per_million < 0 or output_per_million < 0:
        raise ValueError("prices must be >= 0")
    _PRICES[model] = (float(input_per_million), float(output_per_million))


def get_price(model: str) -> Price | None:
    """The price of ``"name@provider"``; the offline ``local`` provider is free.

    A dated name (``gpt-4o-mini-2024-07-18``) falls back to its undated family.
    """
    if model.endswith("@local"):
        return (0.0, 0.0)
    if model in _PRICES:
        return _PRICES[model]
    name, _, provider = model.rpartition("@")
    for known, price in sorted(_PRICES.items(), key=lambda kv: -len(kv[0])):
        kname, _, kprov = known.rpartition("@")
        if kprov == provider and name.startswith(kname + "-"):
            return price
    return None


def compute_cost(model: str, prompt_tokens: int, completion_tokens: int,
                 discount: float = 1.0) -> float | None:
    """Cost in USD, or None (with one warning per model) when the price is unknown."""
    price = get_price(model)
    if price is None:
        if model not in _warned:
            _warned.add(model)
            warnings.warn(f"no price known for {model!r}: its cost is reported as unknown. "
                          "Add one with batchfactory_dagster.llm.set_price(model, in, out)",
                          UserWarning, stacklevel=2)
        return None
    return (prompt_tokens * price[0] + completion_tokens * price[1]) / 1e6 * discount
