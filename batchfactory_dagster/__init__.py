"""batchfactory_dagster: composable, cache-aware pipelines for parallel LLM calls and dataset
generation, that run as plain Python and as Dagster jobs and assets.

    import batchfactory_dagster as bf
    from batchfactory_dagster.op import *
"""

from . import brokers, core, llm, op
from .core import *
from .core import __all__ as _core_all
from .llm.prices import set_price
from .llm.providers import register_provider

__version__ = "0.3.0"

__all__ = sorted([*_core_all, "brokers", "llm", "op", "register_provider", "set_price"])
