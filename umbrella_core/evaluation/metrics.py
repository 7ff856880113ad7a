"""The field's evaluation metrics, as pure functions of answers.

Each question of a held-out set falls in one family (:func:`question_family`)
and is scored by that family's function:

* :func:`categorical_metrics`: a closed set of answers (sex, side, scanner):
  accuracy, balanced accuracy, macro-F1, AUROC and the confusion matrix;
* :func:`numeric_metrics`: a number, maybe with a unit (age, volume): MAE,
  RMSE, Pearson r and R² over the answers that parse as numbers;
* :func:`text_metrics`: free text (reports): exact match, BLEU, ROUGE-L.

Whatever the family, :func:`answer_health` says how many of the answers the
model generates (greedily, as ``umbrella generate`` prints them) end within
their token budget and parse as an answer of the question's kind, and
:func:`generated_accuracy` scores a categorical question by those answers: a
question scored by the likelihood of its candidates cannot look better than
what the model says.

Every result carries the figures of a trivial predictor (chance, the training
majority, the training mean) under ``"reference"``, because a metric means
little without them: 80 % accuracy is no achievement where 80 % of the subjects
are male.

Results hold only Python ``int``/``float``/``str``/``None``/lists/dicts, so they
go to JSON as they are. The metrics come from scikit-learn, sacrebleu and
rouge-score, imported when first used so that importing this module stays cheap.
Answers are compared as given: normalising them (case, punctuation, extracting
the answer from a sentence) is the caller's job.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "OTHER_LABEL",
    "parse_number",
    "question_family",
    "categorical_metrics",
    "numeric_metrics",
    "text_metrics",
    "PARSE_RULES",
    "answer_health",
    "generated_accuracy",
]

#: Confusion-matrix label of the answers that are none of the classes.
OTHER_LABEL = "(other)"

# Thousands separators only in groups of three ("1,234"), so that "1,5" (a
# European decimal comma) is refused rather than read as 15 or 1.5.
_NUMBER = r"""
    [+-]?
    (?: (?: \d{1,3} (?: ,\d{3} )+ | \d+ ) (?: \.\d* )? | \.\d+ )
    (?: [eE][+-]?\d+ )?
"""
# A unit word: letters, maybe a power ("mm3", "mm^3", "m²") and a denominator
# ("ml/min"); or a percent sign.
_UNIT = r"""
    (?: [^\W\d_]+ (?: \^?\d )? (?: / [^\W\d_]+ (?: \^?\d )? )? | % )
"""
_NUMBER_ANSWER = re.compile(
    rf"""
    ^ \s* (?P<number> {_NUMBER} )
    (?: \s* (?P<unit1> {_UNIT} ) (?: \s+ (?P<unit2> {_UNIT} ) )? )?
    \s* \.? \s* $
    """,
    re.VERBOSE,
)
# Words that join two numbers or qualify one ("63 or more", "3x3"): the answer
# is then not one number, whatever follows.
_NOT_UNITS = frozenset({"or", "to", "and", "nor", "than", "vs", "versus", "x", "plus", "minus"})


def parse_number(text: str) -> float | None:
    """Read an answer that is one number, maybe followed by a unit.

    Accepted grammar (surrounding whitespace and one final period allowed)::

        answer := number [unit [unit]] ["."]
        number := [+-] (digits | d{1,3}(,ddd)+) [.digits] [e[+-]digits] | [+-] .digits
        unit   := letters [[^]digit] [/letters [[^]digit]] | "%"

    so ``"63"``, ``"63 years"``, ``"63 years old"``, ``"12.5 mL"``, ``"12.5mL"``,
    ``"-3.2e1 mm"``, ``"1,234 voxels"``, ``"4 mm^3"``, ``"45%"`` (45.0, not 0.45)
    and ``"63."`` parse. Refused (None): no digits (``"about sixty"``,
    ``"left"``, ``""``), several numbers or a range (``"63 or 64"``,
    ``"12-15"``, ``"3x3"``), a joining word as unit (``"63 or more"``), more
    than two unit words or a sentence around the number (``"the age is 63"``),
    a comma that is not a thousands separator (``"1,5"``), and values that
    overflow to infinity. A Unicode minus sign (U+2212) counts as ``-``.

    Args:
        text: The answer.

    Returns:
        The number, or None when ``text`` is not one number.
    """
    match = _NUMBER_ANSWER.match(text.replace("\u2212", "-"))
    if match is None:
        return None
    for unit in (match["unit1"], match["unit2"]):
        if unit is not None and re.sub(r"[\d^]", "", unit).casefold() in _NOT_UNITS:
            return None
    value = float(match["number"].replace(",", ""))
    return value if math.isfinite(value) else None


def question_family(answers: Sequence[str], *, max_classes: int = 10) -> str:
    """Guess how a question's answers should be scored.

    * ``"numeric"``: at least 95 % of the answers parse (:func:`parse_number`;
      a few free-text answers such as "unknown" do not change the family) and
      they take at least 3 distinct values, so that a yes/no question coded
      0/1 stays categorical;
    * ``"categorical"``: at most ``max_classes`` distinct answers, each seen
      at least twice on average (``2 * distinct <= len(answers)``): a small
      closed set that repeats, where accuracy and a confusion matrix mean
      something. Answers are compared exactly as given;
    * ``"text"``: anything else, including no answers at all.

    Args:
        answers: The reference answers of one question (usually the training
            records').
        max_classes: The most distinct answers a categorical question has.

    Returns:
        ``"numeric"``, ``"categorical"`` or ``"text"``.
    """
    if not answers:
        return "text"
    numbers = [value for value in map(parse_number, answers) if value is not None]
    if len(numbers) >= 0.95 * len(answers) and len(set(numbers)) >= 3:
        return "numeric"
    distinct = len(set(answers))
    if distinct <= max_classes and 2 * distinct <= len(answers):
        return "categorical"
    return "text"


def categorical_metrics(
    references: Sequence[str],
    predictions: Sequence[str],
    *,
    classes: Sequence[str],
    probabilities: Any = None,
    train_references: Sequence[str] = (),
) -> dict[str, Any]:
    """Score answers drawn from a closed set of classes.

    A prediction outside ``classes`` is wrong; it gets a column of its own,
    labelled :data:`OTHER_LABEL`, only when one occurs.

    Balanced accuracy (mean recall) and macro-F1 average over the classes that
    occur in ``references`` (scikit-learn's ``balanced_accuracy_score``
    semantics; for F1 it is ``f1_score(labels=present, average="macro")``): a
    class that is never the reference is left out even if it is predicted,
    while a present class that is never predicted correctly gets F1 0 (and
    scikit-learn's UndefinedMetricWarning is silenced on purpose).

    AUROC: with two classes, the probability of ``classes[1]`` against
    ``classes[1]`` as the positive class; with more, the unweighted mean of
    the one-vs-rest AUROCs of the classes that occur in ``references``
    (scikit-learn's ``multi_class="ovr", average="macro"`` when every class
    occurs, which scikit-learn refuses otherwise). None without
    ``probabilities`` or when fewer than 2 classes occur in ``references``.

    Args:
        references: The true answers, each one of ``classes``.
        predictions: The model's answers, one per reference.
        classes: The possible answers, in the order of the confusion matrix
            and of the columns of ``probabilities``.
        probabilities: Array-like ``(n, len(classes))``: the model's
            probability of each class answer, rows summing to 1.
        train_references: The training records' answers to this question,
            for the majority-class reference. Answers outside ``classes`` are
            not counted.

    Returns:
        ``{"n", "accuracy", "balanced_accuracy", "macro_f1", "auroc",
        "confusion": {"labels", "matrix"}, "reference": {"chance",
        "majority_class", "majority_accuracy", "auroc"}}``. The confusion
        matrix is square over ``labels``, rows the reference, columns the
        prediction (the :data:`OTHER_LABEL` row, when present, is all zero).
        The metrics are None when there are no references.

    Raises:
        ValueError: The lengths differ, ``classes`` is empty or repeats a
            class, a reference is not one of ``classes``, or
            ``probabilities`` has the wrong shape or rows not summing to 1.
    """
    from sklearn.metrics import confusion_matrix

    _same_length(references, predictions)
    classes = _checked_classes(references, classes)
    known = set(classes)
    references = list(references)
    predictions = [p if p in known else OTHER_LABEL for p in predictions]
    labels = classes + ([OTHER_LABEL] if OTHER_LABEL in predictions else [])
    present = [c for c in classes if c in set(references)]
    n = len(references)

    if n:
        scores = _class_scores(references, predictions, present)
        scores["auroc"] = _auroc(references, probabilities, classes, present)
        matrix = confusion_matrix(references, predictions, labels=labels).tolist()
    else:
        scores = dict.fromkeys(("accuracy", "balanced_accuracy", "macro_f1", "auroc"))
        matrix = [[0] * len(labels) for _ in labels]
    return {
        "n": n,
        **scores,
        "confusion": {"labels": labels, "matrix": matrix},
        "reference": _categorical_reference(references, classes, train_references),
    }


def _checked_classes(references: Sequence[str], classes: Sequence[str]) -> list[str]:
    """``classes`` as a list; ValueError when empty, repeating, or missing a reference."""
    classes = list(classes)
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be distinct and not empty, got {classes!r}")
    known = set(classes)
    for reference in references:
        if reference not in known:
            raise ValueError(f"reference answer {reference!r} is not one of {classes!r}")
    return classes


def _class_scores(
    references: list[str], predictions: list[str], present: list[str]
) -> dict[str, float | None]:
    """Accuracy, and balanced accuracy and macro-F1 over the ``present`` classes."""
    from sklearn.exceptions import UndefinedMetricWarning
    from sklearn.metrics import f1_score, recall_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        hits = sum(r == p for r, p in zip(references, predictions, strict=True))
        accuracy = hits / len(references)
        # Macro recall over the present classes is balanced_accuracy_score's
        # definition; recall_score takes the labels, so predictions outside
        # the classes raise no "y_pred contains classes not in y_true".
        balanced = float(
            recall_score(
                references, predictions, labels=present, average="macro", zero_division=0.0
            )
        )
        macro_f1 = float(
            f1_score(references, predictions, labels=present, average="macro", zero_division=0.0)
        )
    return {"accuracy": accuracy, "balanced_accuracy": balanced, "macro_f1": macro_f1}


def _categorical_reference(
    references: list[str], classes: list[str], train_references: Sequence[str]
) -> dict[str, Any]:
    """What answering without the image scores: chance, and the training majority class."""
    known = set(classes)
    counts = Counter(r for r in train_references if r in known)
    majority = max(classes, key=lambda c: counts[c]) if counts else None  # ties: first
    n = len(references)
    return {
        "chance": 1 / len(classes),
        "majority_class": majority,
        "majority_accuracy": (
            references.count(majority) / n if majority is not None and n else None
        ),
        "auroc": 0.5,
    }


def _auroc(
    references: list[str], probabilities: Any, classes: list[str], present: list[str]
) -> float | None:
    if probabilities is None:
        return None
    from sklearn.metrics import roc_auc_score

    scores = np.asarray(probabilities, dtype=float)
    if scores.shape != (len(references), len(classes)):
        raise ValueError(
            f"probabilities must have shape ({len(references)}, {len(classes)}) "
            f"(answers, classes), got {scores.shape}"
        )
    if not np.all(np.isfinite(scores)) or not np.allclose(scores.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("probabilities must be finite and each row must sum to 1")
    if len(present) < 2:
        return None
    truth = np.asarray(references)
    if len(classes) == 2:
        return float(roc_auc_score(truth == classes[1], scores[:, 1]))
    aurocs = [roc_auc_score(truth == c, scores[:, classes.index(c)]) for c in present]
    return float(np.mean(aurocs))


def numeric_metrics(
    references: Sequence[str | float],
    predictions: Sequence[str],
    *,
    train_references: Sequence[str | float] = (),
) -> dict[str, Any]:
    """Score answers that are numbers, maybe with units (:func:`parse_number`).

    Units are not checked or converted: "63 months" reads as 63.

    Args:
        references: The true answers, numbers or strings that parse.
        predictions: The model's answers, one per reference.
        train_references: The training records' answers, for the reference of
            always answering their mean.

    Returns:
        ``{"n", "n_parsed", "unparsed", "mae", "rmse", "pearson_r", "r2",
        "reference": {"train_mean", "mae_train_mean", "rmse_train_mean"}}``.
        ``unparsed`` is the share (0..1) of predictions that do not parse; the
        errors and correlations are over the parsed ones only, and None when
        none parsed. ``pearson_r`` is None with fewer than 2 parsed answers
        or when either side is constant; ``r2`` (scikit-learn's ``r2_score``,
        which gives 1.0 for a perfect fit and 0.0 otherwise when the
        references are constant) is None with fewer than 2. The reference
        figures are those of always answering the training mean, over all the
        references; None without ``train_references``.

    Raises:
        ValueError: The lengths differ, or a reference or training reference
            is not a number.
    """
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    _same_length(references, predictions)
    truth = _numbers(references, "reference")
    train = _numbers(train_references, "training reference")
    pairs = [
        (t, p) for t, p in zip(truth, map(parse_number, predictions), strict=True) if p is not None
    ]
    n = len(truth)
    result: dict[str, Any] = {
        "n": n,
        "n_parsed": len(pairs),
        "unparsed": (n - len(pairs)) / n if n else None,
        "mae": None,
        "rmse": None,
        "pearson_r": None,
        "r2": None,
    }
    if pairs:
        parsed_truth, parsed = (np.array(side) for side in zip(*pairs, strict=True))
        result["mae"] = float(mean_absolute_error(parsed_truth, parsed))
        result["rmse"] = math.sqrt(mean_squared_error(parsed_truth, parsed))
        if len(pairs) >= 2:
            result["r2"] = float(r2_score(parsed_truth, parsed))
            if np.ptp(parsed_truth) > 0 and np.ptp(parsed) > 0:
                result["pearson_r"] = float(np.corrcoef(parsed_truth, parsed)[0, 1])

    reference: dict[str, Any] = {
        "train_mean": None,
        "mae_train_mean": None,
        "rmse_train_mean": None,
    }
    if train:
        mean = float(np.mean(train))
        reference["train_mean"] = mean
        if n:
            errors = np.array(truth) - mean
            reference["mae_train_mean"] = float(np.mean(np.abs(errors)))
            reference["rmse_train_mean"] = math.sqrt(float(np.mean(errors**2)))
    result["reference"] = reference
    return result


def _numbers(values: Sequence[str | float], what: str) -> list[float]:
    numbers = []
    for value in values:
        if isinstance(value, str):
            number = parse_number(value)
        elif isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
            number = float(value)
        else:
            number = None
        if number is None or not math.isfinite(number):
            raise ValueError(f"{what} {value!r} is not a number")
        numbers.append(number)
    return numbers


def text_metrics(references: Sequence[str], predictions: Sequence[str]) -> dict[str, Any]:
    """Score free-text answers.

    * ``exact_match``: the share of answers equal to their reference after
      stripping surrounding whitespace and case-folding;
    * ``bleu``: sacrebleu's corpus BLEU (default 13a tokenisation, 4-grams,
      0-100 as sacrebleu reports it). N-gram counts are pooled over the
      corpus, so a corpus whose answers all have fewer than 4 words scores 0
      even when every answer is right;
    * ``rouge_l``: the mean ROUGE-L F-measure (rouge-score, with Porter
      stemming), 0..1. rouge-score's tokeniser keeps only ASCII letters and
      digits, so text in other scripts scores 0.

    Args:
        references: The true answers.
        predictions: The model's answers, one per reference.

    Returns:
        ``{"n", "exact_match", "bleu", "rouge_l"}``; the metrics are None when
        there are no answers.

    Raises:
        ValueError: The lengths differ.
    """
    _same_length(references, predictions)
    n = len(references)
    if not n:
        return {"n": 0, "exact_match": None, "bleu": None, "rouge_l": None}
    import sacrebleu
    from rouge_score import rouge_scorer

    exact = sum(
        r.strip().casefold() == p.strip().casefold()
        for r, p in zip(references, predictions, strict=True)
    )
    bleu = sacrebleu.corpus_bleu(list(predictions), [list(references)]).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [
        scorer.score(r, p)["rougeL"].fmeasure for r, p in zip(references, predictions, strict=True)
    ]
    return {
        "n": n,
        "exact_match": exact / n,
        "bleu": float(bleu),
        "rouge_l": float(np.mean(rouge)),
    }


#: What "parses" means for a generated answer, per kind of question (:func:`answer_health`).
PARSE_RULES = ("categorical", "numeric", "text")


def answer_health(
    generated: Sequence[str],
    ended: Sequence[bool],
    *,
    rule: str = "text",
    classes: Sequence[str] = (),
) -> dict[str, Any]:
    """How many generated answers end and how many parse.

    An answer *ended* when decoding stopped at a stop token (eos or the chat
    template's end-of-turn) before the token budget ran out: a model that
    never ends its turn prints its answer followed by more text until the
    budget, and no parser should be asked to find the answer in that.

    Whether an answer *parses* follows ``rule``:

    * ``"categorical"``: the answer, stripped of surrounding whitespace, is
      exactly one of ``classes``. Case is not folded: the classes are the
      answers as the data writes them, and the likelihood scoring compares
      them exactly too, so ``Left`` for ``left`` is another answer;
    * ``"numeric"``: :func:`parse_number` reads one number from it;
    * ``"text"``: it ended and is not empty (after stripping).

    Args:
        generated: The decoded answers (as ``umbrella generate`` prints them).
        ended: Per answer, whether it ended within the budget.
        rule: One of :data:`PARSE_RULES`.
        classes: The question's answers, for ``"categorical"``.

    Returns:
        ``{"ended", "n_ended", "parsed", "n_parsed"}``: the shares (0..1; None
        without answers) and the counts.

    Raises:
        ValueError: The lengths differ or ``rule`` is unknown.
    """
    if len(generated) != len(ended):
        raise ValueError(f"{len(generated)} answers but {len(ended)} ended flags: one per answer")
    if rule == "categorical":
        known = set(classes)
        parses = [g.strip() in known for g in generated]
    elif rule == "numeric":
        parses = [parse_number(g) is not None for g in generated]
    elif rule == "text":
        parses = [bool(e) and bool(g.strip()) for g, e in zip(generated, ended, strict=True)]
    else:
        raise ValueError(f"rule must be one of {', '.join(PARSE_RULES)}, got {rule!r}")
    n, n_ended, n_parsed = len(generated), sum(map(bool, ended)), sum(parses)
    return {
        "ended": n_ended / n if n else None,
        "n_ended": n_ended,
        "parsed": n_parsed / n if n else None,
        "n_parsed": n_parsed,
    }


def generated_accuracy(
    references: Sequence[str], generated: Sequence[str], ended: Sequence[bool]
) -> float | None:
    """The share of generated answers that are their reference: ended, and after stripping
    surrounding whitespace exactly the reference (case kept, as :func:`answer_health`).

    An answer that did not end counts as wrong even when its text is the
    reference: ``umbrella generate`` would have printed more. None without answers.
    """
    _same_length(references, generated)
    _same_length(generated, ended)
    n = len(references)
    right = sum(
        bool(e) and g.strip() == r for r, g, e in zip(references, generated, ended, strict=True)
    )
    return right / n if n else None


def _same_length(references: Sequence[Any], predictions: Sequence[Any]) -> None:
    if len(references) != len(predictions):
        raise ValueError(
            f"{len(references)} references but {len(predictions)} predictions: "
            "one prediction per reference"
        )
