import re

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")


def words(text):
    """Lower-cased words, punctuation dropped."""
    return [w.lower() for w in _WORD.findall(text)]
