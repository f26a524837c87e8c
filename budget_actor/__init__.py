"""budget_actor: the day's LLM spend, exact to the cent, on trio.

The public API:

* :func:`open_budget` / :class:`Budget`: run the service in-process;
* :class:`BudgetConfig` / :func:`make_config`: the cap, thresholds and friends;
* :class:`Spend`, :class:`AlertNotice`, :class:`Health`: what it reports;
* :class:`Receipt`: what :meth:`Budget.record` returns;
* errors: :class:`InvalidCost`, :class:`ServiceStopped`, :class:`StoreError`,
  :class:`ConfigError`, :class:`Escalation`.

The network face is ``budget_actor.net.server.serve`` (used by ``budget-actor
serve``); the command line is ``budget_actor.cli.main``.
"""

from .core.config import BudgetConfig, ConfigError, make_config
from .core.cost import InvalidCost
from .core.views import Admission, AlertNotice, Health, Spend, Update
from .runtime.messages import ServiceStopped
from .runtime.service import Budget, Receipt, open_budget
from .runtime.supervisor import Escalation, RestartPolicy
from .stores.open import open_store
from .stores.store import Store, StoreError

__all__ = [
    "Admission",
    "AlertNotice",
    "Budget",
    "BudgetConfig",
    "ConfigError",
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
