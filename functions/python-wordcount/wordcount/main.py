from . import tokens
from .stats import most_common


def handler(params, context):
    words = tokens.words(params["text"])
    return {
        "words": len(words),
        "distinct": len(set(words)),
        "top": most_common(words, params.get("top", 3)),
    }
