"""budget_actor: the day's LLM spend, exact to the cent, on trio.

The public API:

* :func:`open_budget` / :class:`Budget`: run the service in-process;
* :class:`BudgetConfig` / :func:`make_config`: the cap, thresholds and friends;
* :class:`Spend`, :class:`AlertNotice`, :class:`Health`: what it reports;
* :class:`Receipt`: what :meth:`Budget.record` returns;
* errors: :class:`InvalidCost`, :class:`CostUnavailable`, :class:`ServiceStopped`,
  :class:`StoreError`, :class:`ConfigError`, :class:`Escalation`.

The network face is ``budget_actor.net.server.serve`` (used by ``budget-actor
serve``); the command line is ``budget_actor.cli.main``. Programs in other
processes use :mod:`budget_actor.client` (asyncio or trio).

The names are imported when first used, so that ``import budget_actor.client``
does not load trio and the service: a client on asyncio pays for neither.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core.config import BudgetConfig, ConfigError, make_config
    from .core.cost import InvalidCost
    from .core.views import Admission, AlertNotice, Health, Receipt, Spend, Update
    from .runtime.messages import CostUnavailable, ServiceStopped
    from .runtime.service import Budget, open_budget
    from .runtime.supervisor import Escalation, RestartPolicy
    from .stores.open import open_store
    from .stores.store import Store, StoreError

# Where each public name lives (imported on first use, see the docstring).
_HOMES = {
    "BudgetConfig": ".core.config",
    "ConfigError": ".core.config",
    "make_config": ".core.config",
    "Admission": ".core.views",
    "AlertNotice": ".core.views",
    "Health": ".core.views",
    "Receipt": ".core.views",
    "Spend": ".core.views",
    "Update": ".core.views",
    "CostUnavailable": ".runtime.messages",
    "ServiceStopped": ".runtime.messages",
    "Budget": ".runtime.service",
    "InvalidCost": ".core.cost",
    "open_budget": ".runtime.service",
    "Escalation": ".runtime.supervisor",
    "RestartPolicy": ".runtime.supervisor",
    "open_store": ".stores.open",
    "Store": ".stores.store",
    "StoreError": ".stores.store",
}

__all__ = [
    "Admission",
    "AlertNotice",
    "Budget",
    "BudgetConfig",
    "ConfigError",
    "CostUnavailable",
    "Escalation",
    "Health",
    "InvalidCost",
    "Receipt",
    "RestartPolicy",
    "ServiceStopped",
    "Spend",
    "Store",
    "StoreError",
    "Update",
    "make_config",
    "open_budget",
    "open_store",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'budget_actor' has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
