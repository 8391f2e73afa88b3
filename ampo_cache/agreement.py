"""How often our verifier agrees with the correctness labels a publisher ships beside its traces.

Counted per (teacher, label column) over the traces an import verified: a trace whose label is
null (the publisher did not judge it, e.g. OpenR1's ``correctness_llama`` on most rows) is counted
as ``unlabelled`` and left out of the comparison. Our side is the verifier's ``correct``, so a
trace it could not finish (``timeout``, ``error``) counts as "not correct", as it does in training.

The labels stay on the stored traces (columns named like the publisher's), so the same numbers are
one SQL query away later (docs/layouts.md).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LabelAgreement:
    teacher: str
    label: str  # the publisher's label column
    compared: int = 0  # traces with a label (true or false)
    publisher_correct: int = 0  # of those, labelled correct by the publisher
    verifier_correct: int = 0  # of those, judged correct by our verifier
    publisher_only: int = 0  # the publisher said correct, our verifier did not
    verifier_only: int = 0  # our verifier said correct, the publisher did not
    unlabelled: int = 0  # label null: not compared

    @property
    def agreed(self) -> int:
        return self.compared - self.publisher_only - self.verifier_only

    @property
    def rate(self) -> float | None:
        """Share of the compared traces on which both say the same; None when none was compared."""
        return self.agreed / self.compared if self.compared else None

    def add(self, publisher: bool | None, ours: bool) -> None:
        if publisher is None:
            self.unlabelled += 1
            return
        self.compared += 1
        self.publisher_correct += int(publisher)
        self.verifier_correct += int(ours)
        self.publisher_only += int(publisher and not ours)
        self.verifier_only += int(ours and not publisher)


Agreement = dict[tuple[str, str], LabelAgreement]  # (teacher, label column) -> counts


def tally(agreement: Agreement, teacher: str, labels: dict[str, bool | None], ours: bool) -> None:
    """Count one verified trace against each of its publisher labels."""
    for label, value in labels.items():
        counts = agreement.get((teacher, label))
        if counts is None:
            counts = agreement[teacher, label] = LabelAgreement(teacher, label)
        counts.add(value, ours)


def agreement_rows(agreement: Agreement) -> list[LabelAgreement]:
    """By teacher; a teacher's label columns in the order the input gave them."""
    return [agreement[key] for key in sorted(agreement, key=lambda key: key[0])]
