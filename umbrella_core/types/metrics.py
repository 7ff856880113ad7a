"""How held-out answers are scored (``umbrella_metrics``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs

from umbrella_core.types._convert import as_tuple, lowered

#: How a metric family gets the model's answers: ``candidates`` scores every
#: answer the question has in the run (one teacher-forced pass, no sampling);
#: ``generate`` decodes the answer greedily.
SCORINGS = ("candidates", "generate")


def _flags(values: Iterable[Any]) -> tuple[bool, ...]:
    return tuple(bool(e) for e in values)


@attrs.frozen(kw_only=True)
class QuestionAnswers:
    """The held-out answers to one question of one modality key, as a metric family scores them.

    Attributes:
        question: The question (the last user turn, image placeholders removed).
        modality_key: The records' modality key (``t1``, ``t1+dmri``).
        references: The reference answer of each held-out sample.
        predictions: The model's answer to each: the most probable candidate
            (``candidates`` scoring) or the greedy decoding (``generate``).
        classes: The candidate answers: every distinct answer to the question
            over the run's records, sorted (``candidates`` scoring; else empty).
        probabilities: Per sample, the model's probability of each class
            (softmax over the candidates' summed log-probabilities); None with
            ``generate`` scoring.
        train_references: The training records' answers to the question, for
            references such as the majority class or the training mean.
        sources: Where each sample's record was read, for reports.
        generated: The greedy answer to each, decoded and stripped as
            ``umbrella generate`` prints it, whatever the scoring (with
            ``generate`` scoring it equals ``predictions``); empty where no
            answer was generated (a value built by hand).
        ended: Per generated answer, whether it ended within the question's
            token budget (decoding stopped at eos or the chat template's
            end-of-turn). A model that never ends its turn can still choose
            the right candidate: the evaluation reports both, and adds
            ``ended`` and ``parsed`` to every family's metrics. (``generated``
            and ``ended``: since 0.4.)
    """

    question: str
    modality_key: str
    references: tuple[str, ...] = attrs.field(converter=as_tuple)
    predictions: tuple[str, ...] = attrs.field(converter=as_tuple)
    classes: tuple[str, ...] = attrs.field(default=(), converter=as_tuple)
    probabilities: tuple[tuple[float, ...], ...] | None = None
    train_references: tuple[str, ...] = attrs.field(default=(), converter=as_tuple)
    sources: tuple[str, ...] = attrs.field(default=(), converter=as_tuple)
    generated: tuple[str, ...] = attrs.field(default=(), converter=as_tuple)
    ended: tuple[bool, ...] = attrs.field(default=(), converter=_flags)

    @ended.validator
    def _one_per_generated(self, attribute: attrs.Attribute[Any], value: tuple[bool, ...]) -> None:
        given = len(self.generated)
        if len(value) != given or given and given != len(self.references):
            raise ValueError(
                f"{len(self.references)} references, {len(self.generated)} generated answers "
                f"and {len(value)} ended flags: give one generated answer and one flag per "
                "reference, or none"
            )


def _scoring(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if value not in SCORINGS:
        raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}, got {value!r}")


@attrs.frozen(kw_only=True)
class MetricFamily:
    """How the held-out answers to a kind of question are scored (``umbrella_metrics``).

    Each held-out question is scored by the first family whose ``applies``
    accepts it: plugins' families before the built-in ``categorical``,
    ``numeric`` and ``text`` ones (which are ``trylast``).

    Attributes:
        name: Shown in tables and metric names (``categorical``, ``mmse``).
        applies: ``applies(question, answers) -> bool``, with every answer the
            question has over the run's records (all splits).
        compute: ``compute(answers: QuestionAnswers) -> Mapping``: metric name
            to a number (or None where undefined), plus optionally
            ``reference`` (a mapping of the figures a reader compares with, such
            as chance) and any JSON-serialisable details (a confusion matrix).
        scoring: ``candidates`` (the model's probability of every answer the
            question has: for few-valued answers) or ``generate`` (greedy
            decoding: numbers, free text).
        table: ``table(metrics) -> [(label, value, reference), ...]``, the rows
            ``umbrella evaluate`` prints, as text; default: every numeric metric.
        figure: ``figure(answers, metrics) -> matplotlib Figure | None``, saved
            as PNG by ``umbrella evaluate`` and logged to TensorBoard.
    """

    name: str = attrs.field(converter=lowered)
    applies: Callable[[str, Sequence[str]], bool] = attrs.field(eq=False, repr=False)
    compute: Callable[[QuestionAnswers], Mapping[str, Any]] = attrs.field(eq=False, repr=False)
    scoring: str = attrs.field(default="generate", validator=_scoring)
    table: Callable[[Mapping[str, Any]], Sequence[tuple[str, str, str]]] | None = attrs.field(
        default=None, eq=False, repr=False
    )
    figure: Callable[[QuestionAnswers, Mapping[str, Any]], Any] | None = attrs.field(
        default=None, eq=False, repr=False
    )
