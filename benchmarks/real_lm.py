"""The demo on real pretrained language models: does a composed model answer cleanly?

For each real language model of ``benchmarks/real_lms.py`` (Gemma 3 270M, a
base model without a chat template; SmolLM2-135M-Instruct, ChatML), the demo's
t1 and dmri through the real command line, two runs each:

* ``default``: ``umbrella train --language DIR --modalities t1,dmri`` with every
  setting at its default, so a composed model trains in LLaVA's two stages
  (stage 1: embedders, vision body and projector on a frozen language model;
  stage 2: LoRA adapters too);
* ``stage1``: the same with ``--trainable projector``, the same number of steps
  in one stage: what stage 2 buys.

Both with ``--max-steps N --batch-size B --demo-subjects S`` and
``--no-progress``. Per run, model and modality, from the runs' ``metrics.json``
(the ``test`` records, scored on ``final/``): the hemisphere question's accuracy
by likelihood and by the generated answer, the coordinate question's MAE beside
the training mean's, the shares of generated answers that ended and that
parsed, the simple baseline's figures where one was fitted; seconds per step
per stage; the peak resident memory of the training process tree
(``/usr/bin/time -v``, else ``getrusage``); and a few ``umbrella generate``
answers on test images, verbatim. Then the issue's "Done when" checks of the
default runs as pass/fail rows.

    python benchmarks/real_lm.py --out benchmarks/results/real_lm.md
    # flags: --models gemma3-270m,smollm2-135m-instruct --max-steps 200 --batch-size 8
    #        --demo-subjects 120 --answers 2 --work DIR (keep the runs) --reuse

Metric names are read defensively (a missing one shows as ``-``, a check on it
as ``unknown``): they are all named in the block below.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from real_lms import MODELS, MissingPackage, language_model_folder  # noqa: E402

# -- names read from the runs' outputs (one place: they may still change) ---------
HELD_OUT = "held_out"  # metrics.json: the test table, per modality key
QUESTIONS = "questions"  # ... -> question text -> {"metrics", "baseline", ...}
METRICS = "metrics"
BASELINE = "baseline"  # questions[q]["baseline"]: {"metrics": {...}} or {"absent": reason}
BASELINE_ABSENT = "absent"
ACCURACY = "accuracy"  # by likelihood: the more probable of the classes
GENERATED_ACCURACY = "generated_accuracy"  # by the generated answer
ENDED = "ended"  # share of generated answers that ended (end of turn / eos)
PARSED = "parsed"  # share of generated answers that parsed
MAE = "mae"
UNPARSED = "unparsed"  # numeric questions: share of answers that did not parse
REFERENCE = "reference"
MAE_TRAIN_MEAN = "mae_train_mean"  # reference: always answering the training mean
TRAIN_SECONDS = "train_seconds"
STEPS = "steps"
#: The Trainer's log line of an evaluation during training (its seconds are in train_seconds).
EVAL_RUNTIME = re.compile(r"'eval_runtime': '?([0-9.]+)")
#: The recipe's line where a stage starts, in the training command's output.
STAGE_START = re.compile(r"^stage (\d+)/\d+ ")
STAGES_FILE = "stages.json"  # a staged run: one entry per stage, its metrics included
METRICS_FILE = "metrics.json"  # a one-stage run
CHECKPOINT_META = "umbrella.json"  # final/'s run metadata: "studies", "config"

#: The demo's two questions (the first-party plugins' ``Demo.question`` / ``Demo.measure``).
HEMISPHERE = "Which hemisphere holds the lesion?"
COORDINATE = "What is the RAS x coordinate of the centre of the lesion, in cm?"
#: Fallback when a question's text changed: a word it holds.
KEYWORDS = {HEMISPHERE: "hemisphere", COORDINATE: "coordinate"}

MODALITIES = ("t1", "dmri")
#: The runs per model: name -> extra ``umbrella train`` flags.
ARMS: dict[str, list[str]] = {"default": [], "stage1": ["--trainable", "projector"]}
ARM_TITLES = {"default": "default (two stages)", "stage1": "stage 1 only (projector)"}

# The "Done when", on the default runs.
MIN_GENERATED_ACCURACY = 0.95
MIN_PARSED = 0.99
MAX_MAE_SHARE = 0.5

# -- running ----------------------------------------------------------------------

#: Without /usr/bin/time: run the command, write the largest child's peak RSS (KiB).
RUSAGE_WRAPPER = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""


def umbrella() -> list[str]:
    """The ``umbrella`` command of this interpreter's environment."""
    script = Path(sys.executable).with_name("umbrella")
    if script.is_file():
        return [str(script)]
    found = shutil.which("umbrella")
    if found:
        return [found]
    raise SystemExit("no `umbrella` command: pip install -e . first")


def gnu_time() -> str | None:
    """``/usr/bin/time`` if it is GNU time (``-v`` reports the peak RSS)."""
    path = "/usr/bin/time"
    if not os.access(path, os.X_OK):
        return None
    probe = subprocess.run([path, "-v", "true"], capture_output=True, text=True, check=False)
    return path if "Maximum resident set size" in probe.stderr else None


def measured(command: list[str], log: Path) -> dict[str, Any]:
    """Run ``command`` (output to ``log``); exit status, wall seconds and peak RSS (bytes)."""
    usage = log.with_suffix(".rusage")
    timer = gnu_time()
    if timer:
        wrapped = [timer, "-v", "-o", str(usage), *command]
    else:
        wrapped = [sys.executable, "-c", RUSAGE_WRAPPER, str(usage), *command]
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.call(wrapped, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    peak = None
    if usage.is_file():
        text = usage.read_text()
        if timer:
            peak = gnu_time_peak(text)
        elif text.strip():
            peak = int(text) * 1024
    return {
        "returncode": code,
        "wall_seconds": round(wall, 1),
        "peak_rss_bytes": peak,
        "peak_rss_by": "/usr/bin/time -v" if timer else "getrusage(RUSAGE_CHILDREN)",
    }


def gnu_time_peak(text: str) -> int | None:
    """Peak RSS in bytes from what ``/usr/bin/time -v`` wrote."""
    line = [x for x in text.splitlines() if "Maximum resident set size" in x]
    return int(line[0].rsplit(":", 1)[1]) * 1024 if line else None


def finished(out_dir: Path, log: Path) -> dict[str, Any] | None:
    """What :func:`measured` gives, for a run already finished in ``out_dir`` (``--reuse``):
    started by hand as ``/usr/bin/time -v umbrella train ... > LOG 2>&1``, say."""
    if not ((out_dir / "final").exists() and log.is_file()):
        return None
    usage = log.with_suffix(".rusage")
    peak = gnu_time_peak(usage.read_text() if usage.is_file() else log.read_text())
    return {
        "returncode": 0,
        "wall_seconds": None,
        "peak_rss_bytes": peak,
        "peak_rss_by": "/usr/bin/time -v",
    }


def train_command(args: argparse.Namespace, folder: Path, out_dir: Path, arm: str) -> list[str]:
    return [
        *umbrella(),
        "train",
        "--language",
        str(folder),
        "--modalities",
        ",".join(MODALITIES),
        "--output-dir",
        str(out_dir),
        "--no-progress",
        "--max-steps",
        str(args.max_steps),
        "--batch-size",
        str(args.batch_size),
        "--demo-subjects",
        str(args.demo_subjects),
        *ARMS[arm],
        *(part for setting in args.set for part in ("--set", setting)),
    ]


def run_one(args: argparse.Namespace, model: str, folder: Path, arm: str) -> dict[str, Any]:
    """Train one run (or, with ``--reuse``, read a finished one), then collect its figures."""
    name = f"{model}-{arm}"
    out_dir = args.work / name
    saved = args.work / f"{name}.result.json"
    if args.reuse and saved.is_file():
        print(f"{name}: reusing {saved}", flush=True)
        return json.loads(saved.read_text())
    command = train_command(args, folder, out_dir, arm)
    result: dict[str, Any] = {"model": model, "arm": arm, "command": command}
    done = finished(out_dir, args.work / f"{name}.log") if args.reuse else None
    if done is not None:
        print(f"{name}: reading the finished run in {out_dir}", flush=True)
        result |= done
    else:
        print(f"{name}: {' '.join(command)}", flush=True)
        shutil.rmtree(out_dir, ignore_errors=True)
        result |= measured(command, args.work / f"{name}.log")
    if result["returncode"] != 0:
        tail = (args.work / f"{name}.log").read_text().splitlines()[-15:]
        result["error"] = "\n".join(tail)
        print(f"{name}: FAILED (exit {result['returncode']}):\n" + result["error"], flush=True)
        return result
    result["stages"] = stage_metrics(out_dir, args.work / f"{name}.log")
    held_out = result["stages"][-1].get(HELD_OUT) if result["stages"] else None
    result["figures"] = {m: figures(held_out, m) for m in MODALITIES}
    result["answers"] = generated_answers(args, out_dir / "final")
    for stage in result["stages"]:
        stage.pop(HELD_OUT, None)  # kept in the run folder; the figures above are its part
    saved.write_text(json.dumps(result, indent=2) + "\n")
    return result


# -- reading a run ------------------------------------------------------------------


def evaluation_seconds(log: Path) -> dict[int, float]:
    """Per stage, the seconds of the evaluations during training (from the command's output)."""
    seconds: dict[int, float] = {}
    stage = 1
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return seconds
    for line in text.splitlines():
        start = STAGE_START.match(line)
        if start:
            stage = int(start.group(1))
        for found in EVAL_RUNTIME.findall(line):
            seconds[stage] = seconds.get(stage, 0.0) + float(found)
    return seconds


def stage_metrics(out_dir: Path, log: Path) -> list[dict[str, Any]]:
    """Per stage: steps, train seconds (and the evaluations' part), seconds per step and the
    held-out table."""
    staged = out_dir / STAGES_FILE
    if staged.is_file():
        entries = json.loads(staged.read_text())
    elif (out_dir / METRICS_FILE).is_file():
        entries = [{"stage": 1, **json.loads((out_dir / METRICS_FILE).read_text())}]
    else:
        return []
    evaluations = evaluation_seconds(log)
    stages = []
    for entry in entries:
        steps, seconds = entry.get(STEPS), entry.get(TRAIN_SECONDS)
        evaluating = evaluations.get(entry.get("stage", 1), 0.0)
        known = bool(steps) and seconds is not None
        stages.append(
            {
                "stage": entry.get("stage"),
                "overrides": entry.get("overrides", {}),
                STEPS: steps,
                TRAIN_SECONDS: seconds,
                "eval_seconds": round(evaluating, 1),
                "seconds_per_step": seconds / steps if known else None,
                "seconds_per_step_without_evaluation": (
                    (seconds - evaluating) / steps if known else None
                ),
                HELD_OUT: entry.get(HELD_OUT),
            }
        )
    return stages


def question(held_out: Any, modality: str, text: str) -> dict[str, Any] | None:
    """``held_out[modality][questions][text]``, or the one question holding its keyword."""
    asked = _get(held_out, modality, QUESTIONS)
    if not isinstance(asked, dict):
        return None
    if text in asked:
        return asked[text]
    near = [q for q in asked if KEYWORDS[text] in q.lower()]
    return asked[near[0]] if len(near) == 1 else None


def _get(value: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _parsed(metrics: Any) -> float | None:
    parsed = _number(_get(metrics, PARSED))
    if parsed is None and _number(_get(metrics, UNPARSED)) is not None:
        parsed = 1 - metrics[UNPARSED]
    return parsed


def _baseline(entry: Any, *names: str) -> dict[str, Any]:
    if _get(entry, BASELINE, BASELINE_ABSENT) is not None:
        return {"absent": str(entry[BASELINE][BASELINE_ABSENT])}
    metrics = _get(entry, BASELINE, METRICS)
    if not isinstance(metrics, dict):
        return {}
    return {name: _number(metrics.get(name)) for name in names}


def figures(held_out: Any, modality: str) -> dict[str, Any]:
    """The figures of the table for one modality of one run (None where missing)."""
    hemi, coord = question(held_out, modality, HEMISPHERE), question(held_out, modality, COORDINATE)
    hm, cm = _get(hemi, METRICS), _get(coord, METRICS)
    return {
        "hemisphere": {
            ACCURACY: _number(_get(hm, ACCURACY)),
            GENERATED_ACCURACY: _number(_get(hm, GENERATED_ACCURACY)),
            ENDED: _number(_get(hm, ENDED)),
            PARSED: _parsed(hm),
            "n": _get(hemi, "n") or _get(hm, "n"),
            "baseline": _baseline(hemi, ACCURACY, GENERATED_ACCURACY),
        },
        "coordinate": {
            MAE: _number(_get(cm, MAE)),
            MAE_TRAIN_MEAN: _number(_get(cm, REFERENCE, MAE_TRAIN_MEAN)),
            ENDED: _number(_get(cm, ENDED)),
            PARSED: _parsed(cm),
            UNPARSED: _number(_get(cm, UNPARSED)),
            "n": _get(coord, "n") or _get(cm, "n"),
            "baseline": _baseline(coord, MAE),
        },
        "raw": {"hemisphere": hemi, "coordinate": coord},
    }


# -- generated answers ---------------------------------------------------------------


def demo_manifest(args: argparse.Namespace, final: Path) -> Path:
    """The run's demo manifest: from ``final/umbrella.json``, else written with the same count."""
    try:
        meta = json.loads((final / CHECKPOINT_META).read_text())
    except (OSError, ValueError):
        meta = {}
    locations = list(meta.get("studies") or [])
    for study in _get(meta, "config", "data", "studies") or []:
        locations.append(study.get("location") if isinstance(study, dict) else study)
    for location in locations:
        path = Path(str(location))
        path = path / "manifest.jsonl" if path.is_dir() else path
        if path.name.endswith(".jsonl") and path.is_file():
            return path
    target = args.work / f"demo-{args.demo_subjects}"
    if not (target / "manifest.jsonl").is_file():
        subprocess.run(
            [*umbrella(), "demo-data", str(target), "--subjects", str(args.demo_subjects),
             "--modalities", ",".join(MODALITIES)],
            check=True, capture_output=True,
        )  # fmt: skip
    return target / "manifest.jsonl"


def test_questions(manifest: Path, per_modality: int) -> list[dict[str, Any]]:
    """The first ``per_modality`` test subjects of each modality, every question asked of them."""
    chosen: dict[str, list[str]] = {m: [] for m in MODALITIES}
    asked = []
    for line in manifest.read_text().splitlines():
        record = json.loads(line)
        if record.get("split") != "test" or len(record.get("images", ())) != 1:
            continue
        image = record["images"][0]
        modality, subject = image["modality"], record["subject"]
        if modality not in chosen:
            continue
        if subject not in chosen[modality]:
            if len(chosen[modality]) == per_modality:
                continue
            chosen[modality].append(subject)
        turns = record["conversation"]
        prompt = next(t["content"] for t in turns if t["role"] == "user")
        answer = next(t["content"] for t in turns if t["role"] == "assistant")
        paths = image["path"] if isinstance(image["path"], list) else [image["path"]]
        asked.append(
            {
                "modality": modality,
                "subject": subject,
                "question": prompt.replace("<image>", "").strip(),
                "prompt": prompt,
                "expected": answer,
                "images": ",".join(str(manifest.parent / p) for p in paths),
            }
        )
    return asked


def generated_answers(args: argparse.Namespace, final: Path) -> list[dict[str, Any]]:
    """``umbrella generate`` on a few test images, its printed answer kept verbatim."""
    if args.answers <= 0 or not final.exists():
        return []
    out = []
    for item in test_questions(demo_manifest(args, final), args.answers):
        command = [
            *umbrella(), "generate", "--checkpoint", str(final), "--image", item["images"],
            "--modality", item["modality"], "--prompt", item["prompt"],
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        answer = done.stdout[:-1] if done.stdout.endswith("\n") else done.stdout
        if done.returncode != 0:
            answer = None
        out.append(
            {
                **{k: item[k] for k in ("modality", "subject", "question", "expected")},
                "answer": answer,
                "error": done.stderr.strip().splitlines()[-1:] if done.returncode else None,
            }
        )
        print(f"  {item['modality']} {item['subject']} {item['question']!r}: "
              f"expected {item['expected']!r}, answered {answer!r}", flush=True)  # fmt: skip
    return out


# -- report ---------------------------------------------------------------------------


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f}"


def baseline_cell(baseline: dict[str, Any], name: str, fmt: Any) -> str:
    if "absent" in baseline:
        return "absent"
    return fmt(baseline.get(name))


def checks(result: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """The issue's "Done when" for one run: check -> (pass | FAIL | unknown, the figures)."""
    if result.get("returncode") != 0 or "figures" not in result:
        return {name: ("unknown", "run failed") for name in CHECKS}
    fig = result["figures"]

    def judged(values: dict[str, float | None], ok: Any, show: Any) -> tuple[str, str]:
        shown = ", ".join(f"{k} {show(v)}" for k, v in values.items())
        if any(v is None for v in values.values()):
            return "unknown", shown
        return ("pass" if all(ok(v) for v in values.values()) else "FAIL"), shown

    hemi = {m: fig[m]["hemisphere"] for m in MODALITIES}
    coord = {m: fig[m]["coordinate"] for m in MODALITIES}
    ended = {f"{m} {q}": fig[m][q][ENDED] for m in MODALITIES for q in ("hemisphere", "coordinate")}
    share = {
        m: c[MAE] / c[MAE_TRAIN_MEAN] if c[MAE] is not None and c[MAE_TRAIN_MEAN] else None
        for m, c in coord.items()
    }
    return {
        CHECKS[0]: judged(
            {m: h[GENERATED_ACCURACY] for m, h in hemi.items()},
            lambda v: v >= MIN_GENERATED_ACCURACY,
            pct,
        ),
        CHECKS[1]: judged(ended, lambda v: v >= 1.0, pct),
        CHECKS[2]: judged({m: c[PARSED] for m, c in coord.items()}, lambda v: v >= MIN_PARSED, pct),
        CHECKS[3]: judged(
            share, lambda v: v < MAX_MAE_SHARE, lambda v: "-" if v is None else f"{v:.2f}x"
        ),
    }


CHECKS = (
    f"generated hemisphere answer right >= {MIN_GENERATED_ACCURACY:.0%} of test subjects",
    "every generated answer ends (ended = 100 %)",
    f"coordinate answers parse >= {MIN_PARSED:.0%}",
    f"coordinate MAE below {MAX_MAE_SHARE:g}x the training mean's MAE",
)


def machine() -> dict[str, Any]:
    cpu, usable = "unknown", hasattr(os, "sched_getaffinity")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu or platform.processor(),
        "threads": os.cpu_count(),
        "threads_usable": len(os.sched_getaffinity(0)) if usable else None,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
    }


def reproduce(args: argparse.Namespace) -> str:
    parts = [
        "python benchmarks/real_lm.py",
        f"--models {','.join(args.models)}",
        f"--max-steps {args.max_steps}",
        f"--batch-size {args.batch_size}",
        f"--demo-subjects {args.demo_subjects}",
        f"--answers {args.answers}",
    ]
    if args.arms != list(ARMS):
        parts.append(f"--arms {','.join(args.arms)}")
    parts.extend(f"--set {setting}" for setting in args.set)
    if args.out:
        parts.append(f"--out {args.out}")
    return " ".join(parts)


def report(args: argparse.Namespace, runs: list[dict], info: dict, sources: dict) -> str:
    lines = [
        "# Composed models on real pretrained language models: the demo",
        "",
        "    " + reproduce(args),
        "",
        f"Machine: {info['cpu']}, {info['threads']} threads ({info['threads_usable']} usable), "
        f"{info['memory_gib']} GiB; load average at start {info['load_average_at_start']}; "
        f"{info['date']}. Each run: `umbrella train --language DIR --modalities "
        f"{','.join(MODALITIES)} --no-progress --max-steps {args.max_steps} --batch-size "
        f"{args.batch_size} --demo-subjects {args.demo_subjects}` (`stage1`: plus "
        "`--trainable projector`). Figures are of `final/` on the demo's `test` subjects.",
        "",
        "| model | kind | parameters | vocabulary | chat template | folder |",
        "|---|---|---:|---:|---|---|",
    ]
    for name in args.models:
        s = sources.get(name, {})
        params, vocabulary = s.get("parameters"), s.get("vocabulary")
        template = {True: "yes", False: "no"}.get(s.get("chat_template"), "-")
        lines.append(
            f"| {name} | {MODELS[name].kind} | {f'{params:,}' if params else '-'} | "
            f"{f'{vocabulary:,}' if vocabulary else '-'} | {template} | `{s.get('folder', '-')}` |"
        )
    lines += [
        "",
        f"## {HEMISPHERE}",
        "",
        "| model | run | modality | n | accuracy (likelihood) | accuracy (generated) | ended "
        "| parsed | baseline accuracy (likelihood / generated) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    ok = [r for r in runs if "figures" in r]
    for r in ok:
        for m in MODALITIES:
            h = r["figures"][m]["hemisphere"]
            b = h["baseline"]
            base = (
                "absent"
                if "absent" in b
                else f"{pct(b.get(ACCURACY))} / {pct(b.get(GENERATED_ACCURACY))}"
            )
            lines.append(
                f"| {r['model']} | {r['arm']} | {m} | {h['n'] or '-'} | {pct(h[ACCURACY])} | "
                f"{pct(h[GENERATED_ACCURACY])} | {pct(h[ENDED])} | {pct(h[PARSED])} | {base} |"
            )
    lines += [
        "",
        f"## {COORDINATE}",
        "",
        "| model | run | modality | n | MAE cm | training mean's MAE cm | MAE / mean's "
        "| parsed | unparsed | ended | baseline MAE cm |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in ok:
        for m in MODALITIES:
            c = r["figures"][m]["coordinate"]
            share = c[MAE] / c[MAE_TRAIN_MEAN] if c[MAE] is not None and c[MAE_TRAIN_MEAN] else None
            lines.append(
                f"| {r['model']} | {r['arm']} | {m} | {c['n'] or '-'} | {num(c[MAE])} | "
                f"{num(c[MAE_TRAIN_MEAN])} | {num(share)} | {pct(c[PARSED])} | "
                f"{pct(c[UNPARSED])} | {pct(c[ENDED])} | "
                f"{baseline_cell(c['baseline'], MAE, num)} |"
            )
    absent = sorted(
        {
            f"{m} {q}: {r['figures'][m][q]['baseline']['absent']}"
            for r in ok
            for m in MODALITIES
            for q in ("hemisphere", "coordinate")
            if "absent" in r["figures"][m][q]["baseline"]
        }
    )
    if absent:
        lines += ["", "Baseline absent: " + "; ".join(absent) + "."]
    lines += [
        "",
        "## Time and memory",
        "",
        "| model | run | stage | trainable | steps | train s | of which evaluation s | s / step "
        "| s / step without evaluation | whole command s | peak RSS MiB |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        stages = r.get("stages") or []
        for s in stages:
            trainable = s["overrides"].get("model.trainable") or (
                "projector" if r["arm"] == "stage1" else "-"
            )
            lines.append(
                f"| {r['model']} | {r['arm']} | {s['stage']} | {trainable} | {s[STEPS] or '-'} "
                f"| {num(s[TRAIN_SECONDS], 1)} | {num(s.get('eval_seconds'), 1)} "
                f"| {num(s['seconds_per_step'])} "
                f"| {num(s.get('seconds_per_step_without_evaluation'))} | | |"
            )
        steps = sum(s[STEPS] or 0 for s in stages)
        seconds = sum(s[TRAIN_SECONDS] or 0 for s in stages)
        timed = all(s.get("eval_seconds") is not None for s in stages)
        evaluating = sum(s["eval_seconds"] for s in stages) if timed else None
        lines.append(
            f"| {r['model']} | {r['arm']} | **all** | | {steps or '-'} | {num(seconds, 1)} | "
            f"{num(evaluating, 1)} | {num(seconds / steps if steps else None)} | "
            f"{num((seconds - evaluating) / steps if steps and timed else None)} | "
            f"{num(r.get('wall_seconds'), 0)} | {mib(r.get('peak_rss_bytes'))} |"
            if r.get("returncode") == 0
            else f"| {r['model']} | {r['arm']} | **failed** (exit {r.get('returncode')}) "
            f"| | | | | | | {num(r.get('wall_seconds'), 0)} | {mib(r.get('peak_rss_bytes'))} |"
        )
    peak_by = next((r.get("peak_rss_by") for r in runs if r.get("peak_rss_by")), "-")
    lines += [
        "",
        "Train seconds are the runs' own `train_seconds` (the Trainer's loop, its evaluations "
        "on the validation subjects included: their `eval_runtime`, read from the command's "
        "output, is the evaluation column); the whole command adds composing the model, "
        "reading the demo, saving and the final evaluation on the test subjects. Peak RSS: "
        f"{peak_by}, the largest process of the training command's tree.",
        "",
        "## Done when (the default runs)",
        "",
        "| check | " + " | ".join(args.models) + " |",
        "|---|" + "---|" * len(args.models),
    ]
    judged = {(r["model"], r["arm"]): checks(r) for r in runs}
    for check in CHECKS:
        cells = []
        for name in args.models:
            status, shown = judged.get((name, "default"), {}).get(check, ("unknown", "not run"))
            cells.append(f"**{status}** ({shown})" if status != "pass" else f"pass ({shown})")
        lines.append(f"| {check} | " + " | ".join(cells) + " |")
    if "stage1" in args.arms:
        lines += [
            "",
            "The same checks of the stage-1-only runs: "
            + "; ".join(
                f"{name}: "
                + ", ".join(
                    judged.get((name, "stage1"), {}).get(c, ("unknown",))[0] for c in CHECKS
                )
                for name in args.models
            )
            + " (in the order above).",
        ]
    lines += ["", "## Generated answers (`umbrella generate`, verbatim as JSON strings)", ""]
    for r in ok:
        if not r.get("answers"):
            continue
        lines += [f"{r['model']}, {ARM_TITLES.get(r['arm'], r['arm'])}:", "", "```"]
        for a in r["answers"]:
            answer = (
                "(failed: " + " ".join(a["error"] or []) + ")"
                if a["answer"] is None
                else (json.dumps(a["answer"], ensure_ascii=False))
            )
            asked = KEYWORDS.get(a["question"], a["question"])
            lines.append(
                f"{a['modality']:<5} {a['subject']:<14} {asked:<12} "
                f"expected {json.dumps(a['expected'], ensure_ascii=False):<9} answered {answer}"
            )
        lines += ["```", ""]
    failed = [r for r in runs if r.get("returncode") != 0]
    for r in failed:
        lines += [f"{r['model']}-{r['arm']} failed (exit {r.get('returncode')}):", "", "```",
                  r.get("error", ""), "```", ""]  # fmt: skip
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default=",".join(MODELS), help="comma-separated (default: both)"
    )
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated runs per model")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--demo-subjects", type=int, default=120, help="per modality")
    parser.add_argument(
        "--answers", type=int, default=2, help="test subjects per modality asked with generate"
    )
    parser.add_argument(
        "--lm-dir", type=Path, help="folder of the converted LMs (real_lms.py --dir)"
    )
    parser.add_argument(
        "--work",
        type=Path,
        help="keep the runs here (default: a temporary folder, removed at the end)",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="with --work: read runs already finished there (a run folder NAME-ARM with its "
        "final/ and NAME-ARM.log counts too)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting for every run (umbrella train --set), e.g. trainer.eval_strategy=end",
    )
    parser.add_argument("--out", type=Path, help="write the markdown here (and .json beside it)")
    args = parser.parse_args()
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    for name in args.models:
        if name not in MODELS:
            parser.error(f"--models: unknown {name!r}; known: {', '.join(MODELS)}")
    for arm in args.arms:
        if arm not in ARMS:
            parser.error(f"--arms: unknown {arm!r}; known: {', '.join(ARMS)}")

    info = machine() | {"date": datetime.date.today().isoformat()}
    temporary = None
    if args.work is None:
        temporary = tempfile.TemporaryDirectory(prefix="real-lm-")
        args.work = Path(temporary.name)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs, sources = [], {}
    try:
        for name in args.models:
            try:
                folder = language_model_folder(name, args.lm_dir)
            except MissingPackage as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            source_file = folder / "real_lm.json"
            sources[name] = {"folder": str(folder)} | (
                json.loads(source_file.read_text()) if source_file.is_file() else {}
            )
            for arm in args.arms:
                runs.append(run_one(args, name, folder, arm))
    finally:
        if temporary is not None:
            temporary.cleanup()
    table = report(args, runs, info, sources)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
        summary = {
            "command": reproduce(args),
            "machine": info,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "models": sources,
            "runs": runs,
            "checks": {f"{r['model']}-{r['arm']}": checks(r) for r in runs},
            "wall_seconds": round(time.perf_counter() - started, 1),
        }
        args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if all(r.get("returncode") == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
