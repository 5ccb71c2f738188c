"""Plan search: `planner.search(request)` -> SearchResult (see solve.py for how it works).

`planner.search` is both this package and the function users call, as the issue's interface asks: the
package's module class is swapped for a callable one (module `__class__` assignment, Python >= 3.5), so
`planner.search(request)` and `from planner.search import search` both work.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from planner.search.solve import search

__all__ = ["search"]


class _CallableModule(types.ModuleType):
    def __call__(self, request: Any, resolve_profile: Any = None) -> Any:
        return search(request, resolve_profile)


sys.modules[__name__].__class__ = _CallableModule
