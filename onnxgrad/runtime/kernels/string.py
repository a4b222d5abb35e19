"""String kernels: StringConcat, StringSplit, StringNormalizer, RegexFullMatch, and
TfIdfVectorizer (n-gram counts over strings or integers).

String tensors are numpy object arrays of Python str.
"""

from __future__ import annotations

import itertools
import re

import numpy as np

from onnxgrad.runtime.kernels import KernelNode
from onnxgrad.runtime.kernels.sequence import kernel_if_missing


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _strings(values, shape) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out.reshape(shape)


_concat = np.frompyfunc(lambda a, b: _text(a) + _text(b), 2, 1)


@kernel_if_missing("StringConcat")
def string_concat(node: KernelNode):
    """StringConcat: X + Y elementwise, with broadcasting."""
    return lambda x, y: (np.asarray(_concat(x, y), dtype=object),)


@kernel_if_missing("RegexFullMatch")
def regex_full_match(node: KernelNode):
    """RegexFullMatch: whether each string matches `pattern` entirely (Python's re, which
    agrees with RE2 on the common syntax)."""
    pattern = re.compile(node.attrs["pattern"])

    def run(x):
        flat = [pattern.fullmatch(_text(v)) is not None for v in x.reshape(-1)]
        return (np.array(flat, dtype=bool).reshape(x.shape),)

    return run


@kernel_if_missing("StringSplit")
def string_split(node: KernelNode):
    """StringSplit: each string split on `delimiter` (absent or "": runs of whitespace,
    trimmed) at most `maxsplit` times; pieces padded with "" to the longest; their counts."""
    delimiter = node.attrs.get("delimiter") or None
    maxsplit = node.attrs.get("maxsplit", -1)

    def run(x):
        pieces = [_text(v).split(delimiter, maxsplit) for v in x.reshape(-1)]
        width = max((len(p) for p in pieces), default=0)
        padded = [p + [""] * (width - len(p)) for p in pieces]
        y = _strings([s for p in padded for s in p], x.shape + (width,))
        z = np.array([len(p) for p in pieces], dtype=np.int64).reshape(x.shape)
        return y, z

    return run


@kernel_if_missing("StringNormalizer")
def string_normalizer(node: KernelNode):
    """StringNormalizer: stop words removed (case-insensitively unless is_case_sensitive),
    then lower- or upper-cased; a [C] or [1, C] input; nothing left gives one ""."""
    action = node.attrs.get("case_change_action", "NONE")
    if action not in ("NONE", "LOWER", "UPPER"):
        raise NotImplementedError(f"StringNormalizer case_change_action '{action}'")
    sensitive = bool(node.attrs.get("is_case_sensitive", 0))
    stopwords = [_text(s) for s in node.attrs.get("stopwords", [])]
    stop = set(stopwords) if sensitive else {s.lower() for s in stopwords}

    def run(x):
        words = [_text(v) for v in x.reshape(-1)]
        kept = [w for w in words if (w if sensitive else w.lower()) not in stop]
        if action == "LOWER":
            kept = [w.lower() for w in kept]
        elif action == "UPPER":
            kept = [w.upper() for w in kept]
        kept = kept or [""]
        shape = (1, len(kept)) if x.ndim == 2 else (len(kept),)
        return (_strings(kept, shape),)

    return run


@kernel_if_missing("TfIdfVectorizer")
def tf_idf_vectorizer(node: KernelNode):
    """TfIdfVectorizer: counts of the pool's n-grams (lengths min..max, skipping up to
    max_skip_count items between members) per row; IDF clips counts to 1; IDF and TFIDF
    scale by the weights."""
    attrs = node.attrs
    mode = attrs["mode"]
    if mode not in ("TF", "IDF", "TFIDF"):
        raise NotImplementedError(f"TfIdfVectorizer mode '{mode}'")
    min_n, max_n = attrs["min_gram_length"], attrs["max_gram_length"]
    max_skip = attrs["max_skip_count"]
    indexes = list(attrs["ngram_indexes"])
    starts = list(attrs["ngram_counts"])
    if "pool_strings" in attrs:
        pool = [_text(s) for s in attrs["pool_strings"]]
    else:
        pool = [int(v) for v in attrs["pool_int64s"]]
    weights = np.asarray(attrs.get("weights", [1.0] * len(indexes)), dtype=np.float32)
    size = max(indexes) + 1

    # 1. The pool as {n-gram tuple: output coordinate}, n-gram lengths 1, 2, ... in turn.
    table: dict[tuple, int] = {}
    k = 0
    bounds = starts + [len(pool)]
    for n, (lo, hi) in enumerate(itertools.pairwise(bounds), start=1):
        for i in range(lo, hi, n):
            table[tuple(pool[i : i + n])] = k
            k += 1

    def counts(row: list) -> np.ndarray:
        out = np.zeros(size, dtype=np.float32)
        for n in range(min_n, max_n + 1):
            # A 1-gram is the same whatever the skip: count it once.
            for skip in range(max_skip + 1 if n > 1 else 1):
                step = skip + 1
                for i in range(len(row) - (n - 1) * step):
                    k = table.get(tuple(row[i : i + (n - 1) * step + 1 : step]))
                    if k is not None:
                        out[indexes[k]] += 1
        return out

    def run(x):
        rows = x.reshape(1, -1) if x.ndim == 1 else x
        cast = _text if x.dtype == object else int
        y = np.stack([counts([cast(v) for v in r]) for r in rows])
        if mode != "TF":
            scale = np.zeros(size, dtype=np.float32)
            scale[indexes] = weights
            y = (np.minimum(y, 1) if mode == "IDF" else y) * scale
        return (y[0] if x.ndim == 1 else y,)

    return run
