"""Basic arithmetic over a list of numbers (the Python twin of nodejs-calculator).

params: {"operation": "add" | "subtract" | "multiply" | "divide", "values": [number, ...]}
result: {"value": number}

subtract and divide fold left: subtract [10, 2, 3] is (10 - 2) - 3 = 5.
Integers stay integers where the answer is exact (add [1, 2, 3] is 6, not 6.0;
divide [10, 2] is 5). Dividing by zero is the client's mistake: it raises an
error with code INVALID_PARAMS, which the API answers with 400.
"""

import math


class InvalidParams(ValueError):
    """Raised for a client's mistake; the runtime maps `code` to INVALID_PARAMS."""

    code = "INVALID_PARAMS"


# Results and inputs beyond this are not exactly representable as a JSON number
# in every client (JavaScript), so integral floats are only turned into ints below it.
_SAFE_INTEGER = 2**53


def _add(a, b):
    return a + b


def _subtract(a, b):
    return a - b


def _multiply(a, b):
    return a * b


def _divide(a, b):
    if b == 0:
        raise InvalidParams("Division by zero: a divisor in 'values' is 0")
    if isinstance(a, int) and isinstance(b, int) and a % b == 0:
        return a // b  # exact: keep it an integer
    return a / b


OPERATIONS = {"add": _add, "subtract": _subtract, "multiply": _multiply, "divide": _divide}


def _is_number(value):
    # bool is an int in Python but not a number in JSON.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _tidy(value):
    """Finite float with an integral value and in the safe range -> int (3.0 -> 3)."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= _SAFE_INTEGER:
        return int(value)
    return value


def handler(params, context):
    operation = params.get("operation")
    values = params.get("values")

    # The controller checks the manifest's schema first; these checks keep the
    # function correct when it is called some other way.
    if operation not in OPERATIONS:
        raise InvalidParams(f"'operation' must be one of {', '.join(OPERATIONS)}")
    if not isinstance(values, list) or not values:
        raise InvalidParams("'values' must be a non-empty array of numbers")
    if not all(_is_number(v) and math.isfinite(v) for v in values):
        raise InvalidParams("'values' must contain only finite numbers")

    apply = OPERATIONS[operation]
    value = values[0]
    for operand in values[1:]:
        value = apply(value, operand)

    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidParams(f"the result of {operation} is too large to represent")
    return {"value": _tidy(value)}
