from collections import Counter


def most_common(words, n):
    """The n most frequent words with their counts; ties by first appearance."""
    return [[word, count] for word, count in Counter(words).most_common(n)]
