"""Stable identities: one problem is one prompt, however it was spaced or where it came from.

Normalisation of the problem text before hashing (documented in docs/store.md):
  1. Unicode NFKC (full-width digits, ligatures and non-breaking spaces become their plain forms);
  2. every run of whitespace becomes one space; leading and trailing whitespace is dropped.
Case and punctuation are kept: in mathematics they carry meaning ("x" is not "X").
prompt_id = the first 16 hex digits of SHA-256 of the UTF-8 of the normalised text.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

_WHITESPACE = re.compile(r"\s+")


def normalise_problem(problem: str) -> str:
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", problem)).strip()


def prompt_id(problem: str) -> str:
    return hashlib.sha256(normalise_problem(problem).encode("utf-8")).hexdigest()[:16]


def text_hash(text: str) -> str:
    """Identity of a trace's text (exact bytes): the same trace imported twice is one trace."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
