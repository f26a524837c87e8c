"""budget_actor: the day's LLM spend, exact to the cent, on trio.

The public API:

* :func:`open_budget` / :class:`Budget`: run the service in-process;
* :class:`BudgetConfig` / :func:`make_config`: the cap, thresholds and friends;
* :class:`Spend`, :class:`AlertNotice`, :class:`Health`: what it reports;
* :class:`Receipt`: what :meth:`Budget.record` returns;
* errors: :class:`InvalidCost`, :class:`ServiceStopped`, :class:`StoreError`,
  :class:`ConfigError`, :class:`Escalation`.

The network face is ``budget_actor._server.serve`` (used by ``budget-actor
serve``); the command line is ``budget_actor._cli``.
"""

from ._config import BudgetConfig, ConfigError, make_config
from ._messages import ServiceStopped
from ._service import Budget, InvalidCost, Receipt, open_budget
from ._store import Store, StoreError, open_store
from ._supervisor import Escalation, RestartPolicy
from ._views import Admission, AlertNotice, Health, Spend, Update

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
