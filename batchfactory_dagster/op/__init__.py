"""The op catalogue: ``from batchfactory_dagster.op import *``."""

from ..brokers.base import BrokerFailureBehavior
from ..core.graph import GraphSegment, Segment, wire
from . import _fields, broker_call, chat, common, control, llm, outputs, sources, spawn
from .broker_call import *
from .chat import *
from .common import *
from .control import *
from .llm import *
from .outputs import *
from .sources import *
from .spawn import *

__all__ = sorted(
    {"BrokerFailureBehavior", "GraphSegment", "Segment", "wire"}
    | {name for mod in (broker_call, chat, common, control, llm, outputs, sources, spawn) for name in mod.__all__}
    - {"get_field", "pairs", "template_fields", "restore_order", "IdxAllocator",
       "entries_from_items"}
)
