"""The verifier: extract a final answer from a reasoning trace and compare it with the ground truth.

One verifier serves the whole project (import, build, trainer rewards, eval), so a trace is judged
the same way everywhere.

Extraction, first match wins:
  0. a response that closes an ``<answer>...</answer>`` pair (the R1-style system turn of verl,
     LUFFY and the AMPO reference asks for one) is answered inside its last pair: rules 1-4
     applied to the tag's content, else the content's last non-empty line (``<answer> $\\frac{1}{2}$
     </answer>`` -> ``\\frac{1}{2}``). The tag is the answer the response declares, so it wins over
     a box elsewhere in the text. A pair with nothing in it (or an empty box) falls through to the
     rules below, on the whole text; an unclosed ``<answer>`` (a truncated response) is no pair;
  1. the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), read by ``ampo_cache.boxed``;
  2. the text after the last "the answer is" (case-insensitive), up to the end of its line;
  3. the text after the last ``####``;
  4. the text after the last line starting ``A:``;
  5. the last plain number in the text (``-1,234.5``, ``3/4``).

A response without a closed ``<answer>...</answer>`` pair is judged by rules 1-5 alone, exactly as
before rule 0 existed: the trainer's reward and the cache build share this verifier.

Comparison: when both sides are plain numbers (thousands separators allowed) they are compared
exactly as decimals, in-process: that is most traces and it is fast. Everything else goes to
math-verify (``parse`` + ``verify``), which understands LaTeX fractions, sets, intervals, etc.

math-verify can hang on pathological LaTeX, so ``Verifier`` runs it in a pebble process pool with
a per-item timeout: a stuck item is killed and marked ``timeout``, a crashed worker marks its item
``error``, and the rest of the batch carries on.
"""

from __future__ import annotations

import logging
import multiprocessing
import re
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Callable, Sequence

from ampo_cache.boxed import boxes, last_box, last_boxed_content

STATUSES = ("correct", "wrong", "no_answer", "timeout", "error")


@dataclass(frozen=True)
class Verdict:
    status: str  # one of STATUSES
    extracted: str | None = None

    @property
    def correct(self) -> bool:
        return self.status == "correct"


# ---------------------------------------------------------------- extraction

_ANSWER_IS_RE = re.compile(r"the (?:final )?answer is[:\s]*([^\n]+)", re.IGNORECASE)
_HASHES_RE = re.compile(r"####\s*([^\n]+)")
_A_COLON_RE = re.compile(r"^\s*A:\s*(.+?)\s*$", re.MULTILINE)
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?")
_TAG_OPEN_RE, _TAG_CLOSE_RE = re.compile(r"<answer>", re.IGNORECASE), re.compile(r"</answer>", re.IGNORECASE)


def _clean(answer: str) -> str:
    """Strip what surrounds an answer in prose: spaces, $ delimiters, a trailing full stop."""
    return re.sub(r"^[\s$]+|[\s$.]+$", "", answer)


def _last_number(text: str) -> tuple[str, int] | None:
    numbers = list(_NUMBER_RE.finditer(text))
    return (_clean(numbers[-1].group()), numbers[-1].start()) if numbers else None


def _last_line(text: str) -> tuple[str, int] | None:
    offset, found = 0, None
    for line in text.splitlines(keepends=True):
        if _clean(line):
            found = (_clean(line), offset)
        offset += len(line)
    return found


def _answer_in(text: str, last_resort: Callable[[str], tuple[str, int] | None]) -> tuple[str, int] | None:
    """Rules 1-4 on ``text`` (a box found first decides, even an empty one), else ``last_resort``;
    the answer with the character where its rule found it."""
    box = last_box(text)
    if box is not None:
        answer = _clean(box.content(text))
        return (answer, box.start) if answer else None
    for pattern in (_ANSWER_IS_RE, _HASHES_RE, _A_COLON_RE):
        matches = list(pattern.finditer(text))
        if matches:
            inner = last_boxed_content(matches[-1].group(1))
            answer = _clean(inner if inner is not None else matches[-1].group(1))
            if answer:
                return answer, matches[-1].start()
    return last_resort(text)


def answer_tag_content(text: str) -> str | None:
    """The content of the last closed ``<answer>...</answer>`` pair (case-insensitive), or None."""
    span = _answer_tag_span(text)
    return None if span is None else text[span[0]:span[1]]


def _answer_tag_span(text: str) -> tuple[int, int] | None:
    closes = [m.start() for m in _TAG_CLOSE_RE.finditer(text)]
    if not closes:
        return None
    opens = [m.end() for m in _TAG_OPEN_RE.finditer(text, 0, closes[-1])]
    return (opens[-1], closes[-1]) if opens else None


def answer_span(text: str) -> tuple[str, int] | None:
    """The trace's final answer and the character where the rule that read it found it (the box,
    the phrase, the tag's content, the number), or None when it states none."""
    span = _answer_tag_span(text)
    if span is not None:  # rule 0; an empty pair falls through to the whole text
        tagged = _answer_in(text[span[0]:span[1]], _last_line)
        if tagged is not None:
            return tagged[0], span[0] + tagged[1]
    return _answer_in(text, _last_number)


def extract_answer(text: str) -> str | None:
    """The trace's final answer as text, or None when it states none."""
    found = answer_span(text)
    return None if found is None else found[0]


def answer_position(text: str) -> int | None:
    """Where in ``text`` the answer the verifier reads was found (None: no answer). Prefix guidance
    asks whether it lies in what the student wrote."""
    found = answer_span(text)
    return None if found is None else found[1]


def first_answer_form(text: str, answer: str | None = None) -> int | None:
    """The first character at which ``text`` states an answer in any form the verifier reads: a
    box, "the answer is", ``####``, a line starting ``A:``, an ``<answer>`` tag, or (the last-number
    rule) ``answer`` itself as a standalone number. A prefix of a trace cut before it gives the
    student the reasoning but not the answer. None: no form appears."""
    starts = [box.start for box in boxes(text)[:1]]
    for pattern in (_ANSWER_IS_RE, _HASHES_RE, _A_COLON_RE, _TAG_OPEN_RE):
        match = pattern.search(text)
        if match is not None:
            starts.append(match.start())
    if answer:
        own = re.search(rf"(?<![\d.]){re.escape(answer.strip())}(?![\d]|\.\d)", text)
        if own is not None:
            starts.append(own.start())
    return min(starts) if starts else None


# ---------------------------------------------------------------- comparison

_PLAIN_NUMBER_RE = re.compile(r"^-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?$")


def _as_decimal(answer: str) -> Decimal | None:
    compact = answer.replace(" ", "").replace("{,}", ",")
    if not _PLAIN_NUMBER_RE.match(compact):
        return None
    try:
        return Decimal(compact.replace(",", ""))
    except InvalidOperation:
        return None


def _math_verify_equal(answer: str, extracted: str) -> bool:
    """math-verify on both sides; no internal timeout (the pool provides one)."""
    from math_verify import parse, verify

    _worker_init()
    gold = parse(f"${answer}$", parsing_timeout=None)
    pred = parse(f"${extracted}$", parsing_timeout=None)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=None))


def _fast_verdict(text: str, answer: str) -> tuple[Verdict | None, str | None]:
    """Decide without math-verify when possible; else return the extracted answer to check."""
    extracted = extract_answer(text)
    if extracted is None:
        return Verdict("no_answer"), None
    if _clean(answer) == extracted:
        return Verdict("correct", extracted), extracted
    gold_num, pred_num = _as_decimal(_clean(answer)), _as_decimal(extracted)
    if gold_num is not None and pred_num is not None:
        return Verdict("correct" if gold_num == pred_num else "wrong", extracted), extracted
    return None, extracted


def _slow_status(answer: str, extracted: str) -> str:
    try:
        return "correct" if _math_verify_equal(answer, extracted) else "wrong"
    except Exception:  # noqa: BLE001 - any failure inside math-verify is this item's error
        return "error"


def verify_one(text: str, answer: str) -> Verdict:
    """Verify in this process, with no timeout: for trusted or small inputs (and tests)."""
    verdict, extracted = _fast_verdict(text, answer)
    if verdict is not None:
        return verdict
    return Verdict(_slow_status(answer, extracted), extracted)


def _worker_init() -> None:
    # math-verify warns once per process that we disabled its timeout: we did, on purpose.
    logging.getLogger("math_verify").setLevel(logging.ERROR)


class Verifier:
    """Verifies batches with a reusable process pool; each slow item gets ``timeout`` seconds.

    ``workers=0`` runs everything in-process (no timeout protection): useful in tests and when the
    inputs are known to be plain numbers.
    """

    def __init__(self, timeout: float = 5.0, workers: int | None = None):
        self.timeout = timeout
        self.workers = max(1, multiprocessing.cpu_count()) if workers is None else workers
        self._pool = None

    def _get_pool(self):
        if self._pool is None:
            from pebble import ProcessPool

            # forkserver: workers never inherit the caller's threads (torch, DuckDB) or its memory.
            self._pool = ProcessPool(
                max_workers=self.workers,
                context=multiprocessing.get_context("forkserver"),
                initializer=_worker_init,
            )
        return self._pool

    def verify(self, texts: Sequence[str], answers: Sequence[str]) -> list[Verdict]:
        if len(texts) != len(answers):
            raise ValueError(f"{len(texts)} texts but {len(answers)} answers")
        verdicts: list[Verdict | None] = []
        slow: list[tuple[int, str, str]] = []
        for i, (text, answer) in enumerate(zip(texts, answers)):
            verdict, extracted = _fast_verdict(text, answer)
            verdicts.append(verdict)
            if verdict is None:
                slow.append((i, answer, extracted))
        if not slow:
            return verdicts  # type: ignore[return-value]
        if self.workers == 0:
            for i, answer, extracted in slow:
                verdicts[i] = Verdict(_slow_status(answer, extracted), extracted)
            return verdicts  # type: ignore[return-value]
        pool = self._get_pool()
        futures = [(i, extracted, pool.schedule(_slow_status, (answer, extracted), timeout=self.timeout))
                   for i, answer, extracted in slow]
        for i, extracted, future in futures:
            try:
                verdicts[i] = Verdict(future.result(), extracted)
            except FutureTimeout:
                verdicts[i] = Verdict("timeout", extracted)
            except Exception:  # noqa: BLE001 - a worker that died (ProcessExpired) or raised
                verdicts[i] = Verdict("error", extracted)
        return verdicts  # type: ignore[return-value]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.stop()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> "Verifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

