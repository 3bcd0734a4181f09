"""KV memory store: host mirror, device reserve, page table, recall."""

from .layout import BudgetError, ReserveLayout, SequenceBytes, plan_layout
from .resident import resident_positions
from .store import KVStore

__all__ = ["BudgetError", "KVStore", "ReserveLayout", "SequenceBytes", "plan_layout", "resident_positions"]
