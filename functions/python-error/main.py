"""Fails on purpose, to show what a function error looks like to a client.

Without params it raises ZeroDivisionError two calls deep (handler ->
average_price -> the division), so the client sees the message, the line and
column of the division, and the traceback through both functions.
With {"message": "..."} it raises RuntimeError(message) instead.
Either way the API answers 500 RUNTIME_ERROR.
"""


def handler(params, context):
    message = params.get("message")
    if message is not None:
        raise RuntimeError(str(message))
    order = {"total": 42, "items": 0}
    return {"average": average_price(order)}


def average_price(order):
    return order["total"] / order["items"]  # items is 0: ZeroDivisionError
