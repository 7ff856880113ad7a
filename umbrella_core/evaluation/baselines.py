"""The simple baseline beside every figure of a held-out table (ARCHITECTURE I13).

For each modality key and question of the table, a linear model on a cheap
representation of the images: logistic regression for a categorical question
(its probabilities over the question's classes give AUROC), ridge regression
for a numeric one (answers parsed with
:func:`~umbrella_core.evaluation.metrics.parse_number`), none for free text.
The representation is the first ``umbrella_baselines`` value whose
``applies`` accepts every image's spec (a plugin's before the built-in
``regional`` one, :mod:`umbrella_core.default_plugins.baselines`); a sample's
images are read by the run's :class:`~umbrella_core.data.dataset.RecordDataset`
(``dataset.images``), so its preprocessing and cache apply, and their features
are concatenated.

Fitting: features standardised on the training samples; the model fitted on
the training split at each value of :data:`GRID` (``C`` of the logistic
regression, ``alpha`` of the ridge); the value with the best validation
accuracy (categorical) or the lowest validation MAE (numeric) is kept, ties
going to the stronger regularisation. The kept model is the one fitted on the
training split alone: the validation samples only choose, so nothing the
table reports took part in fitting or choosing. Scored on the held-out samples
the VLM's table scored (the same ``max_samples`` spread), by the question's
own metric family, so its metrics have the VLM's names.

``evaluation.baselines``: ``auto`` fits where a question has at least
:data:`MIN_TRAIN` training and :data:`MIN_VALIDATION` validation samples with
an answer (and two classes among the training answers); elsewhere the entry
says why not. ``on`` fits wherever it can (without validation samples ``C`` or
``alpha`` is 1); ``off`` adds nothing.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import attrs

from umbrella_core.errors import DataError, PluginError
from umbrella_core.evaluation.engine import (
    Evaluation,
    Question,
    question_and_answer,
    spread_indices,
)
from umbrella_core.evaluation.metrics import parse_number, question_family
from umbrella_core.types import QuestionAnswers

__all__ = [
    "GRID",
    "MAX_TRAIN_SAMPLES",
    "MIN_TRAIN",
    "MIN_VALIDATION",
    "add_baselines",
    "baseline_mode",
]

#: Training samples with an answer a question needs under ``auto``.
MIN_TRAIN = 10
#: Validation samples with an answer a question needs under ``auto``.
MIN_VALIDATION = 3
#: The regularisation values tried: ``C`` (logistic) and ``alpha`` (ridge).
GRID = (1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3)
#: At most this many training samples per question (evenly spread): a linear
#: model on a few hundred features gains little beyond, and reading costs.
MAX_TRAIN_SAMPLES = 10_000
#: The value used when no validation sample can choose one (``on``).
DEFAULT_REGULARISATION = 1.0


def baseline_mode(settings: Mapping[str, Any] | None) -> str:
    """``evaluation.baselines`` of a run's ``evaluation`` section (checked by the config)."""
    return str((settings or {}).get("baselines", "auto"))


@attrs.frozen
class _Sample:
    """One item of a dataset: its record and window, the record's answer, and its images'
    modalities and files (records about one scan share them: it is read once)."""

    dataset: Any
    record: int
    window: int | None
    answer: str
    source: str
    images: tuple[tuple[str, tuple[str, ...]], ...]

    def job(self, baseline: str) -> tuple[Any, ...]:
        return (baseline, id(self.dataset), self.images, self.window)


@attrs.define
class _Plan:
    """What one (key, question) is fitted with."""

    key: str
    question: Question
    provided: Any  # Provided: the Baseline and the plugin that gives it
    kind: str  # categorical | numeric
    specs: list[Any]
    train: list[_Sample]
    targets: list[Any]
    validation: list[_Sample]
    validation_targets: list[Any]
    test: list[_Sample]


def _groups(
    datasets: Iterable[Any], indices: Sequence[int] | None = None
) -> dict[tuple[str, str], list[_Sample]]:
    """The items of ``datasets`` (or those at ``indices`` of the one), by (key, question)."""
    out: dict[tuple[str, str], list[_Sample]] = {}
    for dataset in datasets:
        seen: dict[int, tuple[Any, ...]] = {}
        for index in indices if indices is not None else range(len(dataset.items)):
            record_index, window = dataset.items[index]
            if record_index not in seen:
                record = dataset.records[record_index]
                question, answer = question_and_answer(record)
                images = tuple((image.modality, image.paths) for image in record.images)
                seen[record_index] = (record.modality_key, question, answer, record.source, images)
            key, question, answer, source, images = seen[record_index]
            sample = _Sample(dataset, int(record_index), window, answer, source, images)
            out.setdefault((key, question), []).append(sample)
    return out


def _who(provided: Any) -> str:
    return (
        f"baseline {provided.item.name!r} of plugin {provided.plugin!r} "
        f"(distribution {provided.distribution} {provided.version})".replace(" )", ")")
    )


def _choose(specs: Sequence[Any], baselines: Sequence[Any]) -> Any:
    """The first baseline that represents every spec, or None."""
    for provided in baselines:
        try:
            if all(provided.item.applies(spec) for spec in specs):
                return provided
        except Exception as exc:
            raise PluginError(f"{_who(provided)} failed in applies: {exc}") from exc
    return None


def _targets(kind: str, samples: list[_Sample]) -> tuple[list[_Sample], list[Any]]:
    """The samples with a usable answer, and their answers (numbers where numeric)."""
    if kind == "categorical":
        return samples, [s.answer for s in samples]
    parsed = [(s, parse_number(s.answer)) for s in samples]
    kept = [(s, v) for s, v in parsed if v is not None]
    return [s for s, _ in kept], [v for _, v in kept]


def _plan(
    key: str,
    question: Question,
    test: list[_Sample],
    train: list[_Sample],
    validation: list[_Sample],
    baselines: Sequence[Any],
    mode: str,
) -> _Plan | dict[str, Any]:
    """How (key, question) is fitted, or its entry saying why it is not."""
    first = test[0]
    record = first.dataset.records[first.record]
    specs = [first.dataset.specs[m] for m in dict.fromkeys(record.modalities)]
    if not specs:
        return {"name": None, "absent": "the samples have no image"}
    provided = _choose(specs, baselines)
    if provided is None:
        shown = ", ".join(f"{s.name} ({s.ndim}D, {s.channels} channel(s))" for s in specs)
        return {"name": None, "absent": f"no installed baseline represents {shown}"}
    name = provided.item.name
    if question.family.scoring == "candidates":
        kind = "categorical"
    elif question_family(question.train_answers) == "numeric":
        kind = "numeric"
    else:
        return {"name": name, "absent": "free-text answers: no linear baseline"}
    train, targets = _targets(kind, train)
    if len(train) > MAX_TRAIN_SAMPLES:
        keep = spread_indices(len(train), MAX_TRAIN_SAMPLES)
        train, targets = [train[i] for i in keep], [targets[i] for i in keep]
    validation, validation_targets = _targets(kind, validation)
    need_train, need_validation = (MIN_TRAIN, MIN_VALIDATION) if mode == "auto" else (2, 0)
    if len(train) < need_train:
        return {"name": name, "absent": f"{len(train)} training samples (needs {need_train})"}
    if len(validation) < need_validation:
        return {
            "name": name,
            "absent": f"{len(validation)} validation samples (needs {need_validation})",
        }
    if kind == "categorical" and len(set(targets)) < 2:
        return {"name": name, "absent": f"one class among the training answers ({targets[0]!r})"}
    return _Plan(
        key, question, provided, kind, specs, train, targets, validation, validation_targets, test
    )


def _check(vector: Any, provided: Any, spec: Any, source: str) -> Any:
    """``vector`` as a 1-D float64 array of finite numbers; PluginError naming the plugin."""
    import numpy as np

    where = f"{_who(provided)}: the features of a {spec.name} image of {source}"
    try:
        array = np.asarray(vector, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise PluginError(f"{where} are not numbers ({exc})") from None
    if array.ndim != 1 or array.size == 0:
        raise PluginError(f"{where} must be a non-empty 1-D array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise PluginError(f"{where} hold NaN or infinite values; a feature must be finite")
    return array


class _Reads:
    """Each distinct (dataset, record, window)'s features, for a DataLoader's workers.

    An error is returned, not raised, so that it reaches the caller as one
    line rather than wrapped in a worker's traceback.
    """

    def __init__(self, jobs: list[tuple[Any, _Sample]]) -> None:
        self.jobs = jobs

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> Any:
        import numpy as np

        provided, sample = self.jobs[i]
        dataset = sample.dataset
        try:
            images = dataset.images(dataset.records[sample.record], sample.window)
        except DataError as exc:
            return ("data", str(exc))
        parts = []
        for modality, tensor in images:
            spec = dataset.specs[modality]
            try:
                vector = provided.item.features(spec, tensor.numpy())
                parts.append(_check(vector, provided, spec, sample.source))
            except PluginError as exc:
                return ("plugin", str(exc))
            except Exception as exc:
                return ("plugin", f"{_who(provided)} failed in features: {exc!r}")
        return np.concatenate(parts)


def _features(plans: list[_Plan], workers: int) -> dict[tuple[Any, ...], Any]:
    """The features of every sample the plans use, each image read once per baseline."""
    jobs: dict[tuple[Any, ...], tuple[Any, _Sample]] = {}
    for plan in plans:
        for sample in (*plan.train, *plan.validation, *plan.test):
            jobs.setdefault(sample.job(plan.provided.item.name), (plan.provided, sample))
    order = list(jobs)
    reads = _Reads([jobs[job] for job in order])
    if workers:
        from torch.utils.data import DataLoader, Dataset

        # _Reads is a map-style dataset by its methods, not by subclassing.
        loader: DataLoader[Any] = DataLoader(
            cast("Dataset[Any]", reads), batch_size=8, collate_fn=list, num_workers=workers
        )
        results = [vector for batch in loader for vector in batch]
    else:
        results = [reads[i] for i in range(len(reads))]
    for result in results:
        if isinstance(result, tuple):
            raise (PluginError if result[0] == "plugin" else DataError)(result[1])
    return dict(zip(order, results, strict=True))


def _matrix(plan: _Plan, samples: list[_Sample], features: Mapping[Any, Any]) -> Any:
    import numpy as np

    name = plan.provided.item.name
    rows = [features[s.job(name)] for s in samples]
    lengths = sorted({len(r) for r in rows})
    if len(lengths) > 1:
        raise DataError(
            f"{_who(plan.provided)}: the {plan.key} samples of {plan.question.text!r} have "
            f"{' and '.join(map(str, lengths))} features: their images differ in number or "
            "shape, so one linear model cannot take them"
        )
    return np.stack(rows) if rows else np.zeros((0, 0))


def _fit(plan: _Plan, features: Mapping[Any, Any]) -> tuple[dict[str, Any], QuestionAnswers]:
    """The baseline's entry and answers for one (key, question)."""
    from sklearn.preprocessing import StandardScaler

    train = _matrix(plan, plan.train, features)
    scaler = StandardScaler().fit(train)
    train = scaler.transform(train)
    test = scaler.transform(_matrix(plan, plan.test, features))
    validation = (
        scaler.transform(_matrix(plan, plan.validation, features)) if plan.validation else None
    )
    fit = _categorical if plan.kind == "categorical" else _numeric
    predictions, probabilities, regularisation = fit(plan, train, validation, test)
    question = plan.question
    answers = QuestionAnswers(
        question=question.text,
        modality_key=plan.key,
        references=[s.answer for s in plan.test],
        predictions=predictions,
        classes=question.classes,
        probabilities=probabilities,
        train_references=question.train_answers,
        sources=[s.source for s in plan.test],
        # The baseline's answer is all it says, and it always ends: the family
        # then shows the rows the VLM's answers have (generated accuracy, ...).
        generated=predictions,
        ended=[True] * len(predictions),
    )
    baseline = plan.provided.item
    describe = baseline.describe or (lambda spec: baseline.description)
    entry = {
        "name": baseline.name,
        "plugin": plan.provided.plugin,
        "distribution": plan.provided.distribution,
        "description": baseline.description,
        "representation": "; ".join(f"{s.name}: {describe(s)}" for s in plan.specs),
        "model": "logistic regression" if plan.kind == "categorical" else "ridge regression",
        "regularisation": regularisation,
        "fitted_on": "train",
        "n_train": len(plan.train),
        "n_validation": len(plan.validation),
        "metrics": dict(question.family.compute(answers)),
    }
    return entry, answers


def _choose_value(
    make: Callable[[float], Any],
    score: Callable[[Any], float],
    values: Sequence[float],
    parameter: str,
    chosen_by: str,
    validated: bool,
) -> tuple[Any, dict[str, Any]]:
    """The model fitted at each of ``values`` (strongest regularisation first), the one whose
    validation ``score`` (higher is better) is best: ties keep the earlier one."""
    if not validated:
        model = make(DEFAULT_REGULARISATION)
        return model, {
            "parameter": parameter,
            "value": DEFAULT_REGULARISATION,
            "chosen_by": "default: no validation samples",
        }
    best, best_score, chosen, scores = None, None, values[0], []
    for value in values:
        model = make(value)
        scores.append(score(model))
        if best_score is None or scores[-1] > best_score:
            best, best_score, chosen = model, scores[-1], value
    return best, {
        "parameter": parameter,
        "value": chosen,
        "chosen_by": chosen_by,
        "grid": list(values),
        "validation": [abs(s) for s in scores],
    }


def _categorical(
    plan: _Plan, train: Any, validation: Any, test: Any
) -> tuple[list[str], tuple[tuple[float, ...], ...], dict[str, Any]]:
    import numpy as np
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    def make(c: float) -> Any:
        with warnings.catch_warnings():
            # A few hundred iterations decide the table's figures well enough;
            # the warning would only be noise in the run's output.
            warnings.simplefilter("ignore", ConvergenceWarning)
            return LogisticRegression(C=c, max_iter=1000).fit(train, plan.targets)

    def accuracy(model: Any) -> float:
        return float(np.mean(model.predict(validation) == np.asarray(plan.validation_targets)))

    model, regularisation = _choose_value(
        make, accuracy, GRID, "C", "validation accuracy", validation is not None
    )
    classes = list(plan.question.classes)
    given = model.predict_proba(test)
    probabilities = np.zeros((len(test), len(classes)))
    for column, name in enumerate(model.classes_):
        probabilities[:, classes.index(name)] = given[:, column]
    predictions = [classes[i] for i in probabilities.argmax(axis=1)]
    return predictions, tuple(tuple(map(float, row)) for row in probabilities), regularisation


def _numeric(
    plan: _Plan, train: Any, validation: Any, test: Any
) -> tuple[list[str], None, dict[str, Any]]:
    import numpy as np
    from sklearn.linear_model import Ridge

    def make(alpha: float) -> Any:
        return Ridge(alpha=alpha).fit(train, np.asarray(plan.targets, dtype=np.float64))

    def negative_mae(model: Any) -> float:
        targets = np.asarray(plan.validation_targets, dtype=np.float64)
        return -float(np.mean(np.abs(model.predict(validation) - targets)))

    model, regularisation = _choose_value(
        make, negative_mae, GRID[::-1], "alpha", "validation MAE", validation is not None
    )
    # repr: every digit of the float, so that nothing is lost in parsing it back.
    return [repr(float(v)) for v in model.predict(test)], None, regularisation


def _plans(
    evaluation: Evaluation,
    tests: Mapping[tuple[str, str], Any],
    train_sets: Sequence[Any],
    validation_set: Any,
    questions: Mapping[str, Question],
    baselines: Sequence[Any],
    mode: str,
) -> tuple[list[_Plan], dict[tuple[str, str], dict[str, Any]]]:
    """What to fit per (key, question) of the table, and the entries of those with none
    (their reason); the entries are written once all are fitted, so that a failure
    leaves the table as it was."""
    trains = _groups(train_sets)
    validations = _groups([validation_set]) if validation_set is not None else {}
    plans: list[_Plan] = []
    entries: dict[tuple[str, str], dict[str, Any]] = {}
    for (key, text), test in tests.items():
        if (
            text not in evaluation.results.get(key, {}).get("questions", {})
            or text not in questions
        ):
            continue
        plan = _plan(
            key,
            questions[text],
            test,
            trains.get((key, text), []),
            validations.get((key, text), []),
            baselines,
            mode,
        )
        if isinstance(plan, _Plan):
            plans.append(plan)
        else:
            entries[(key, text)] = plan
    return plans, entries


def add_baselines(
    evaluation: Evaluation,
    *,
    test_set: Any,
    train_sets: Sequence[Any],
    validation_set: Any,
    questions: Mapping[str, Question],
    baselines: Sequence[Any],
    mode: str = "auto",
    max_samples: int = 0,
    workers: int = 0,
    log: Callable[[str], None] = print,
) -> None:
    """Fit and score the baseline of each (key, question) of ``evaluation``'s table.

    Adds ``results[key]["questions"][question]["baseline"]`` (the entry: name,
    plugin, representation, model, regularisation, ``n_train``,
    ``n_validation``, ``metrics``; or ``name`` and ``absent``, the reason)
    and the baseline's answers to ``evaluation.baselines`` (for figures).

    Args:
        evaluation: What :func:`~umbrella_core.evaluation.engine.evaluate_dataset`
            found on ``test_set``.
        test_set: The held-out RecordDataset the table scored.
        train_sets: The run's training RecordDatasets.
        validation_set: Its validation RecordDataset; None where there is none
            apart from ``test_set``.
        questions: The run's questions (their families, classes, training answers).
        baselines: ``PluginManager.baselines()``: the Baselines and their plugins.
        mode: ``auto``, ``on`` or ``off`` (``evaluation.baselines``).
        max_samples: The ``max_samples`` the table was scored with (the same items).
        workers: DataLoader worker processes that read the images.
        log: Where the one-line summary goes.

    Raises:
        PluginError: A baseline's ``applies`` or ``features`` failed, or its
            features are not a 1-D array of finite numbers (naming the plugin).
        DataError: An image cannot be read.
    """
    if mode == "off" or test_set is None:
        return
    started = time.perf_counter()
    tests = _groups([test_set], spread_indices(len(test_set), max_samples))
    plans, entries = _plans(
        evaluation, tests, train_sets, validation_set, questions, baselines, mode
    )
    features = _features(plans, workers)
    fitted: dict[tuple[str, str], QuestionAnswers] = {}
    for plan in plans:
        where = (plan.key, plan.question.text)
        entries[where], fitted[where] = _fit(plan, features)
        n = evaluation.results[plan.key]["questions"][plan.question.text]["n"]
        if n != len(plan.test):  # the table's samples, or the comparison means nothing
            raise RuntimeError(
                f"the baseline of {plan.key} / {plan.question.text!r} scored "
                f"{len(plan.test)} samples, the table {n}"
            )
    for (key, text), entry in entries.items():
        evaluation.results[key]["questions"][text]["baseline"] = entry
    evaluation.baselines.update(fitted)
    log(
        f"baselines: {len(plans)} fitted, {len(entries) - len(plans)} absent, "
        f"{len(features)} images read in {time.perf_counter() - started:.1f} s"
    )
