"""The built-in metric families: categorical, numeric and free-text questions.

They are ``trylast`` implementations of ``umbrella_metrics``, so a plugin's
family for its own tasks is asked first. A question's family follows from its
answers over the run's records (:func:`umbrella_core.evaluation.metrics.question_family`):
numbers with an optional unit are ``numeric``, a few values each given several
times ``categorical``, anything else ``text``.

Each family also says how many of the answers the model generates end and
parse (:func:`umbrella_core.evaluation.metrics.answer_health`, by its own rule),
and the categorical family scores the generated answers beside the most
probable candidates: a model can rank ``left`` above ``right`` and still never
say ``left`` and stop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from umbrella_core.evaluation.report import health_rows
from umbrella_core.hookspecs import hookimpl
from umbrella_core.types import MetricFamily, QuestionAnswers


def _family_is(name: str) -> Any:
    def applies(question: str, answers: Sequence[str]) -> bool:
        from umbrella_core.evaluation.metrics import question_family

        return question_family(answers) == name

    return applies


def _percent(value: Any) -> str:
    return "-" if value is None else f"{value:.1%}"


def _number(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _health(answers: QuestionAnswers, rule: str) -> dict[str, Any]:
    """``ended`` and ``parsed`` of the generated answers (none without them)."""
    from umbrella_core.evaluation.metrics import answer_health

    if not answers.generated:
        return {}
    return answer_health(answers.generated, answers.ended, rule=rule, classes=answers.classes)


def _categorical(answers: QuestionAnswers) -> Mapping[str, Any]:
    from umbrella_core.evaluation.metrics import categorical_metrics, generated_accuracy

    metrics = dict(
        categorical_metrics(
            answers.references,
            answers.predictions,
            classes=answers.classes,
            probabilities=answers.probabilities,
            train_references=answers.train_references,
        )
    )
    if answers.generated:
        metrics["generated_accuracy"] = generated_accuracy(
            answers.references, answers.generated, answers.ended
        )
    return metrics | _health(answers, "categorical")


def _categorical_table(m: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    ref = m.get("reference", {})
    majority = (
        f"majority ({ref['majority_class']}) {_percent(ref['majority_accuracy'])}"
        if ref.get("majority_class") is not None
        else ""
    )
    chance = f"chance {_percent(ref.get('chance'))}"
    # Without generated answers (a table written before they were) one accuracy, unnamed.
    accuracy = (
        [
            ("likelihood accuracy", _percent(m["accuracy"]), majority),
            ("generated accuracy", _percent(m["generated_accuracy"]), majority),
        ]
        if "generated_accuracy" in m
        else [("accuracy", _percent(m["accuracy"]), majority)]
    )
    return [
        *accuracy,
        ("balanced accuracy", _percent(m["balanced_accuracy"]), chance),
        ("macro-F1", _number(m["macro_f1"]), ""),
        ("AUROC", _number(m["auroc"]), "chance 0.500"),
        *health_rows(m),
    ]


def _categorical_figure(answers: QuestionAnswers, m: Mapping[str, Any]) -> Any:
    from umbrella_core.evaluation.figures import confusion_figure

    return confusion_figure(m["confusion"], title=f"{answers.modality_key}: {answers.question}")


def _numeric(answers: QuestionAnswers) -> Mapping[str, Any]:
    from umbrella_core.evaluation.metrics import numeric_metrics

    metrics = numeric_metrics(
        answers.references, answers.predictions, train_references=answers.train_references
    )
    return dict(metrics) | _health(answers, "numeric")


def _numeric_table(m: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    ref = m.get("reference", {})
    mean = ref.get("train_mean")
    said = f"training mean ({_number(mean, 2)})" if mean is not None else ""
    return [
        ("MAE", _number(m["mae"]), f"{said} {_number(ref.get('mae_train_mean'))}" if said else ""),
        (
            "RMSE",
            _number(m["rmse"]),
            f"{said} {_number(ref.get('rmse_train_mean'))}" if said else "",
        ),
        ("Pearson r", _number(m["pearson_r"]), "0"),
        ("R²", _number(m["r2"]), "0 (training mean: ~0)"),
        # "parsed" says it where the answers are known as generated (1 - unparsed).
        *(health_rows(m) or [("unparsed", _percent(m["unparsed"]), "")]),
    ]


def _numeric_figure(answers: QuestionAnswers, m: Mapping[str, Any]) -> Any:
    from umbrella_core.evaluation.figures import scatter_figure
    from umbrella_core.evaluation.metrics import parse_number

    parsed = [
        (parse_number(r), parse_number(p))
        for r, p in zip(answers.references, answers.predictions, strict=True)
    ]
    pairs = [(r, p) for r, p in parsed if r is not None and p is not None]
    return scatter_figure(
        [r for r, _ in pairs],
        [p for _, p in pairs],
        title=f"{answers.modality_key}: {answers.question}",
        mae=m.get("mae"),
    )


def _text(answers: QuestionAnswers) -> Mapping[str, Any]:
    """Text metrics, and the same metrics of always giving the commonest training answer.

    That reference is what a model that ignores the image can reach (a
    template report, say): a figure not clearly above it has not read the scan.
    """
    from collections import Counter

    from umbrella_core.evaluation.metrics import text_metrics

    metrics = dict(text_metrics(answers.references, answers.predictions))
    if answers.train_references:
        # The commonest answer; ties to the first given, so the figure is reproducible.
        common = Counter(answers.train_references).most_common(1)[0][0]
        same = text_metrics(answers.references, [common] * len(answers.references))
        metrics["reference"] = {
            "common_answer": common,
            **{k: same[k] for k in ("exact_match", "bleu", "rouge_l")},
        }
    return metrics | _health(answers, "text")


def _text_table(m: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    ref = m.get("reference", {})

    def common(value: str) -> str:
        return f"commonest training answer {value}" if ref else ""

    return [
        ("exact match", _percent(m["exact_match"]), common(_percent(ref.get("exact_match")))),
        ("BLEU", _number(m["bleu"], 1), common(_number(ref.get("bleu"), 1))),
        ("ROUGE-L", _number(m["rouge_l"]), common(_number(ref.get("rouge_l")))),
        *health_rows(m),
    ]


CATEGORICAL = MetricFamily(
    name="categorical",
    applies=_family_is("categorical"),
    compute=_categorical,
    scoring="candidates",
    table=_categorical_table,
    figure=_categorical_figure,
)
NUMERIC = MetricFamily(
    name="numeric",
    applies=_family_is("numeric"),
    compute=_numeric,
    scoring="generate",
    table=_numeric_table,
    figure=_numeric_figure,
)
TEXT = MetricFamily(
    name="text",
    applies=lambda question, answers: True,
    compute=_text,
    scoring="generate",
    table=_text_table,
)


@hookimpl(trylast=True)
def umbrella_metrics() -> list[MetricFamily]:
    return [CATEGORICAL, NUMERIC, TEXT]
