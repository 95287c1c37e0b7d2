"""Counts its own executions: state kept in module scope.

The runtime imports this module once per instance, so `_count` lives as long
as the instance does. A session initialized with `retain_session: true` keeps
its instance, so its executions see 1, 2, 3, ...; a session without it may
get a fresh instance (and a fresh count) each time.

params (optional): {"step": integer}, default 1.
result: {"count": integer}
"""

import threading


class InvalidParams(ValueError):
    """Raised for a client's mistake; the runtime maps `code` to INVALID_PARAMS."""

    code = "INVALID_PARAMS"


_count = 0
# The runtime runs one execution at a time; the lock keeps the counter right
# even if that ever changes.
_lock = threading.Lock()


def handler(params, context):
    global _count
    step = params.get("step", 1)
    if not isinstance(step, int) or isinstance(step, bool):
        raise InvalidParams("'step' must be an integer")
    with _lock:
        _count += step
        return {"count": _count}
