"""Evaluation metrics and figures, checked against values worked out by hand."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import pytest

from umbrella_core.evaluation.figures import confusion_figure, save_figure, scatter_figure
from umbrella_core.evaluation.metrics import (
    answer_health,
    categorical_metrics,
    generated_accuracy,
    numeric_metrics,
    parse_number,
    question_family,
    text_metrics,
)

# --- parse_number -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("63", 63.0),
        ("  63  ", 63.0),
        ("63.", 63.0),
        ("63 years", 63.0),
        ("63 years.", 63.0),
        ("63.5 years old", 63.5),
        ("12.5 mL", 12.5),
        ("12.5mL", 12.5),
        ("-3.2e1 mm", -32.0),
        ("\u22123 mm", -3.0),
        ("+4", 4.0),
        (".5", 0.5),
        ("1,234 voxels", 1234.0),
        ("1,234,567.5", 1234567.5),
        ("4 mm^3", 4.0),
        ("4 mm3", 4.0),
        ("30 ml/min", 30.0),
        ("45%", 45.0),
        ("45 %", 45.0),
    ],
)
def test_parse_number_accepts(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        ".",
        "left",
        "about sixty",
        "about 60",
        "the age is 63",
        "63 or 64",
        "63 or more",
        "12-15",
        "12 - 15",
        "5 to 10",
        "3x3",
        "1,5",
        "12,34",
        "63 years old man",
        "1e999",
        "nan",
        "inf",
    ],
)
def test_parse_number_refuses(text):
    assert parse_number(text) is None


# --- question_family ----------------------------------------------------------


def test_question_family():
    ages = [str(a) for a in range(40, 60)]  # 20 distinct numbers
    assert question_family(ages) == "numeric"
    # 19/20 = 95 % parse: still numeric; 18/20 = 90 %: not, and 20 distinct: text.
    assert question_family(ages[:19] + ["unknown"]) == "numeric"
    assert question_family(ages[:18] + ["unknown", "n/a"]) == "text"
    # Yes/no coded 0/1: only 2 distinct values, so categorical, not numeric.
    assert question_family(["0", "1", "1", "0"]) == "categorical"
    assert question_family(["male", "female", "male", "female"]) == "categorical"
    # 3 distinct in 5 answers: 2*3 > 5, too few repeats.
    assert question_family(["left", "right", "both", "left", "right"]) == "text"
    twelve = [f"site {i}" for i in range(12)] * 2
    assert question_family(twelve) == "text"  # 12 > max_classes 10
    assert question_family(twelve, max_classes=12) == "categorical"
    assert question_family([]) == "text"


# --- categorical_metrics ------------------------------------------------------


def test_categorical_binary_by_hand():
    from sklearn.metrics import balanced_accuracy_score

    references = ["male", "male", "female", "female", "female"]
    predictions = ["male", "female", "female", "female", "male"]
    # Probability of "male" (classes[1]); rows sum to 1.
    p_male = [0.9, 0.4, 0.4, 0.6, 0.2]
    result = categorical_metrics(
        references,
        predictions,
        classes=["female", "male"],
        probabilities=[[1 - p, p] for p in p_male],
        train_references=["female", "male", "male", "other"],
    )
    assert result["n"] == 5
    # Answers 1, 3, 4 are right.
    assert result["accuracy"] == pytest.approx(3 / 5)
    # Recall female 2/3 (answers 3, 4 of 3, 4, 5), male 1/2 (answer 1 of 1, 2).
    assert result["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert result["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(references, predictions)
    )
    # female: TP 2, FP 1 (answer 2), FN 1 (answer 5): F1 = 2*2 / (2*2 + 1 + 1) = 2/3.
    # male:   TP 1, FP 1 (answer 5), FN 1 (answer 2): F1 = 2*1 / (2*1 + 1 + 1) = 1/2.
    assert result["macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # Positives (male) score 0.9, 0.4; negatives 0.4, 0.6, 0.2. Pairs positive > negative:
    # 0.9 beats all 3; 0.4 ties 0.4 (1/2), loses to 0.6, beats 0.2 (1): (3 + 1.5) / 6.
    assert result["auroc"] == pytest.approx(4.5 / 6)
    assert result["confusion"] == {"labels": ["female", "male"], "matrix": [[2, 1], [1, 1]]}
    # Training majority "male" (2 of the 3 in-class answers; "other" is not a class).
    assert result["reference"] == {
        "chance": 1 / 2,
        "majority_class": "male",
        "majority_accuracy": pytest.approx(2 / 5),
        "auroc": 0.5,
    }
    json.dumps(result)  # plain Python values only


def test_categorical_other_answers_and_never_predicted_class():
    classes = ["left", "right", "both"]
    references = ["left", "left", "right", "right", "both"]
    predictions = ["left", "none", "left", "right", "left"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no sklearn warning leaks
        result = categorical_metrics(
            references,
            predictions,
            classes=classes,
            train_references=["right", "left", "right", "left", "both"],
        )
    # Answers 1 and 4 are right.
    assert result["accuracy"] == pytest.approx(2 / 5)
    # Recall left 1/2 ("none" is wrong), right 1/2, both 0/1.
    assert result["balanced_accuracy"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
    # left:  TP 1, FP 2 (answers 3, 5), FN 1 (answer 2): 2 / (2 + 2 + 1) = 2/5.
    # right: TP 1, FP 0, FN 1 (answer 3): 2 / (2 + 0 + 1) = 2/3.
    # both:  never predicted: 0.
    assert result["macro_f1"] == pytest.approx((2 / 5 + 2 / 3 + 0) / 3)
    assert result["auroc"] is None  # no probabilities
    assert result["confusion"] == {
        "labels": ["left", "right", "both", "(other)"],
        "matrix": [[1, 0, 0, 1], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]],
    }
    # Training tie left/right (2 each): the first in classes order wins.
    assert result["reference"]["majority_class"] == "left"
    assert result["reference"]["majority_accuracy"] == pytest.approx(2 / 5)
    assert result["reference"]["chance"] == pytest.approx(1 / 3)


def test_categorical_averages_over_classes_in_references():
    # "both" never is the reference: left out of balanced accuracy and macro-F1,
    # although it is predicted once.
    result = categorical_metrics(
        ["left", "left", "right"], ["left", "both", "right"], classes=["left", "right", "both"]
    )
    # Recall left 1/2, right 1/1.
    assert result["balanced_accuracy"] == pytest.approx((1 / 2 + 1) / 2)
    # left: TP 1, FP 0, FN 1: 2/3; right: TP 1: 1.
    assert result["macro_f1"] == pytest.approx((2 / 3 + 1) / 2)
    assert result["reference"]["majority_class"] is None
    assert result["reference"]["majority_accuracy"] is None


def test_categorical_multiclass_auroc_by_hand():
    from sklearn.metrics import roc_auc_score

    classes = ["a", "b", "c"]
    references = ["a", "b", "c", "a"]
    probabilities = [
        [0.6, 0.3, 0.1],
        [0.5, 0.3, 0.2],
        [0.2, 0.2, 0.6],
        [0.3, 0.5, 0.2],
    ]
    result = categorical_metrics(
        references, ["a", "a", "c", "b"], classes=classes, probabilities=probabilities
    )
    # a vs rest: positives 0.6, 0.3; negatives 0.5, 0.2. 0.6 beats both (2),
    #   0.3 beats 0.2 (1): 3/4.
    # b vs rest: positive 0.3; negatives 0.3, 0.2, 0.5: tie (1/2) + 1 + 0: 1.5/3.
    # c vs rest: positive 0.6; negatives 0.1, 0.2, 0.2: 3/3.
    assert result["auroc"] == pytest.approx((3 / 4 + 1.5 / 3 + 1) / 3)
    assert result["auroc"] == pytest.approx(
        roc_auc_score(references, probabilities, multi_class="ovr", labels=classes)
    )

    # Only a and b occur: the mean over those two (sklearn refuses this case).
    result = categorical_metrics(
        ["a", "b", "a", "b"], ["a"] * 4, classes=classes, probabilities=probabilities
    )
    # a vs rest: positives 0.6, 0.2; negatives 0.3, 0.3: 2 + 0 = 2/4.
    # b vs rest: positives 0.3, 0.5; negatives 0.3, 0.2: (1/2 + 1) + (1 + 1) = 3.5/4.
    assert result["auroc"] == pytest.approx((2 / 4 + 3.5 / 4) / 2)


def test_categorical_auroc_none_and_bad_input():
    one_class = categorical_metrics(
        ["x", "x"], ["x", "y"], classes=["x", "y"], probabilities=[[0.5, 0.5], [0.1, 0.9]]
    )
    assert one_class["auroc"] is None
    with pytest.raises(ValueError, match="shape"):
        categorical_metrics(["x"], ["x"], classes=["x", "y"], probabilities=[[1.0]])
    with pytest.raises(ValueError, match="sum to 1"):
        categorical_metrics(["x"], ["x"], classes=["x", "y"], probabilities=[[2.0, 3.0]])
    with pytest.raises(ValueError, match="'z' is not one of"):
        categorical_metrics(["z"], ["x"], classes=["x", "y"])
    with pytest.raises(ValueError, match="one prediction per reference"):
        categorical_metrics(["x"], [], classes=["x", "y"])
    empty = categorical_metrics([], [], classes=["x", "y"])
    assert empty["accuracy"] is None and empty["confusion"]["matrix"] == [[0, 0], [0, 0]]


# --- numeric_metrics ----------------------------------------------------------


def test_numeric_by_hand():
    result = numeric_metrics(
        ["60 years", "70 years", "80 years"],
        ["62 years", "sixty", "77"],
        train_references=[50, 60.0, "70 years"],
    )
    assert result["n"] == 3
    assert result["n_parsed"] == 2
    assert result["unparsed"] == pytest.approx(1 / 3)  # "sixty"
    # Parsed pairs (60, 62) and (80, 77): errors 2 and 3.
    assert result["mae"] == pytest.approx((2 + 3) / 2)
    assert result["rmse"] == pytest.approx(math.sqrt((4 + 9) / 2))
    assert result["pearson_r"] == pytest.approx(1.0)  # two points are always on a line
    # R² = 1 - SS_res / SS_tot = 1 - (4 + 9) / ((60 - 70)² + (80 - 70)²).
    assert result["r2"] == pytest.approx(1 - 13 / 200)
    # Training mean (50 + 60 + 70) / 3 = 60; errors on all 3 references: 0, 10, 20.
    assert result["reference"] == {
        "train_mean": pytest.approx(60.0),
        "mae_train_mean": pytest.approx((0 + 10 + 20) / 3),
        "rmse_train_mean": pytest.approx(math.sqrt((0 + 100 + 400) / 3)),
    }
    json.dumps(result)


def test_numeric_pearson_and_none_cases():
    # x = 1, 2, 3 and y = 1, 3, 2: deviations (-1, 0, 1) and (-1, 1, 0);
    # r = (1 + 0 + 0) / sqrt(2 * 2) = 1/2; R² = 1 - (0 + 1 + 1) / 2 = 0.
    result = numeric_metrics([1, 2, 3], ["1", "3", "2"])
    assert result["pearson_r"] == pytest.approx(0.5)
    assert result["r2"] == pytest.approx(0.0)
    assert result["reference"] == {
        "train_mean": None,
        "mae_train_mean": None,
        "rmse_train_mean": None,
    }

    none_parsed = numeric_metrics(["60", "70"], ["old", ""])
    assert none_parsed["unparsed"] == 1.0
    assert none_parsed["mae"] is none_parsed["rmse"] is none_parsed["r2"] is None
    assert none_parsed["pearson_r"] is None

    one_parsed = numeric_metrics(["60", "70"], ["61", "?"])
    assert one_parsed["mae"] == pytest.approx(1.0)
    assert one_parsed["pearson_r"] is None and one_parsed["r2"] is None

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        constant = numeric_metrics(["60", "70", "80"], ["65", "65", "65"])
    assert constant["pearson_r"] is None
    assert constant["r2"] == pytest.approx(1 - (25 + 25 + 225) / 200)

    with pytest.raises(ValueError, match="reference 'old' is not a number"):
        numeric_metrics(["old"], ["60"])
    with pytest.raises(ValueError, match="training reference 'x' is not a number"):
        numeric_metrics(["60"], ["60"], train_references=["x"])


# --- text_metrics -------------------------------------------------------------


def test_text_exact_match_and_rouge_by_hand():
    result = text_metrics(["Left", "the cat sat", "no"], [" left ", "the cat sat down", "yes"])
    assert result["n"] == 3
    assert result["exact_match"] == pytest.approx(1 / 3)  # case and spaces ignored
    # Pair 2: LCS "the cat sat", 3 words; the answer has 4 words, the reference 3:
    # P = 3/4, R = 3/3, F = 2PR / (P + R) = (3/2) / (7/4) = 6/7.
    # Pair 1: F = 1; pair 3: no common word, F = 0.
    assert result["rouge_l"] == pytest.approx((1 + 6 / 7 + 0) / 3)
    json.dumps(result)


def test_text_bleu_by_hand():
    # Answer "the cat sat on the mat today" against "the cat sat on the mat":
    # n-gram precisions 6/7, 5/6, 4/5, 3/4; no brevity penalty (answer longer).
    # BLEU = 100 * (6/7 * 5/6 * 4/5 * 3/4) ** (1/4) = 100 * (3/7) ** (1/4).
    result = text_metrics(["the cat sat on the mat"], ["the cat sat on the mat today"])
    assert result["bleu"] == pytest.approx(100 * (3 / 7) ** 0.25)
    same = text_metrics(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same["bleu"] == pytest.approx(100.0)
    disjoint = text_metrics(["the cat sat on the mat"], ["a dog ran in a park"])
    assert disjoint["bleu"] == pytest.approx(0.0)
    assert disjoint["rouge_l"] == 0.0
    # Corpus BLEU pools 4-gram counts: answers all under 4 words score 0 even when right.
    assert text_metrics(["the cat sat"], ["the cat sat"])["bleu"] == 0.0
    assert text_metrics([], []) == {"n": 0, "exact_match": None, "bleu": None, "rouge_l": None}


# --- generated answers: ended, parsed, generated accuracy ---------------------


def test_answer_health_counts_answers_that_end_and_parse_by_hand():
    # Categorical: exactly a class after stripping whitespace, case kept.
    said = ["left", " right\n", "Left", "leftleftleft", ""]
    ended = [True, True, True, False, True]
    health = answer_health(said, ended, rule="categorical", classes=["left", "right"])
    assert health == {"ended": 0.8, "n_ended": 4, "parsed": 0.4, "n_parsed": 2}
    # Numeric: parse_number reads one number, ended or not ("63 years" cut at the budget).
    said = ["63", "63 years", "about sixty", "63 years63 years"]
    health = answer_health(said, [True, False, True, False], rule="numeric")
    assert health == {"ended": 0.5, "n_ended": 2, "parsed": 0.5, "n_parsed": 2}
    assert numeric_metrics(["60"] * 4, said)["unparsed"] == 1 - health["parsed"]
    # Text: ended and not empty.
    said = ["a lesion", "a lesion on the", "  ", "no lesion"]
    health = answer_health(said, [True, False, True, True], rule="text")
    assert health == {"ended": 0.75, "n_ended": 3, "parsed": 0.5, "n_parsed": 2}
    assert answer_health([], [], rule="text") == {
        "ended": None,
        "n_ended": 0,
        "parsed": None,
        "n_parsed": 0,
    }
    with pytest.raises(ValueError, match="one per answer"):
        answer_health(["a"], [], rule="text")
    with pytest.raises(ValueError, match="rule must be one of"):
        answer_health(["a"], [True], rule="yes/no")


def test_generated_accuracy_counts_an_answer_that_did_not_end_as_wrong():
    references = ["left", "right", "left", "right"]
    # Right and ended; right but cut at the budget (generate would print more); another
    # case; right with a newline after it.
    said = ["left", "right", "LEFT", "right\n"]
    assert generated_accuracy(references, said, [True, False, True, True]) == 0.5
    assert generated_accuracy([], [], []) is None
    with pytest.raises(ValueError, match="one prediction per reference"):
        generated_accuracy(["left"], ["left", "right"], [True, True])


# --- lazy imports -------------------------------------------------------------


def test_importing_metrics_and_figures_stays_light():
    code = (
        "import sys, umbrella_core.evaluation.metrics, umbrella_core.evaluation.figures\n"
        "heavy = {'sklearn', 'matplotlib', 'sacrebleu', 'rouge_score', 'torch'}\n"
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- figures ------------------------------------------------------------------


def test_confusion_figure_and_save(tmp_path):
    confusion = {
        "labels": ["left", "right", "both", "(other)"],
        "matrix": [[1, 0, 0, 1], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]],
    }
    figure = confusion_figure(confusion, title="Which side?")
    axes = figure.axes[0]
    # 3 reference rows (the "(other)" row is not drawn) by 4 answer columns.
    assert [t.get_text() for t in axes.texts] == ["1", "0", "0", "1"] + ["1", "1", "0", "0"] + [
        "1",
        "0",
        "0",
        "0",
    ]
    assert (axes.get_xlabel(), axes.get_ylabel(), axes.get_title()) == (
        "answer",
        "reference",
        "Which side?",
    )
    path = save_figure(figure, tmp_path / "figures" / "side.png")
    assert path == tmp_path / "figures" / "side.png"
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 0

    # The matrix may leave out the (always zero) "(other)" row.
    short = dict(confusion, matrix=confusion["matrix"][:3])
    assert len(confusion_figure(short, title="t").axes[0].texts) == 12
    with pytest.raises(ValueError, match="does not fit"):
        confusion_figure(dict(confusion, matrix=[[1, 2]]), title="t")


def test_scatter_figure_and_save(tmp_path):
    figure = scatter_figure([60, 80], [62, 77], title="Age", mae=2.5)
    axes = figure.axes[0]
    assert axes.get_title() == "Age (MAE 2.5)"
    assert len(axes.collections[0].get_offsets()) == 2
    assert (axes.get_xlabel(), axes.get_ylabel()) == ("reference", "answer")
    data = save_figure(figure, tmp_path / "age.png").read_bytes()
    assert data.startswith(b"\x89PNG")
    # No MAE, no points: still draws.
    empty = scatter_figure([], [], title="Age", mae=None)
    assert empty.axes[0].get_title() == "Age"
    assert save_figure(empty, tmp_path / "nested" / "empty.png").stat().st_size > 0
