"""Device detection: accuracy on a labelled UA file, and speed against bare ``user_agents.parse``.

Printed: overall accuracy, per-class precision/recall/F1, the confusion matrix, then
User-Agents parsed per second by

* ``user_agents.parse`` (the baseline: ua-parser's regexes, no classification),
* ``DeviceDetector(cache_size=0)`` (every UA parsed and classified: the cold path),
* ``DeviceDetector(cache_size=10_000)`` on a Zipf-distributed event stream over the same
  UAs (what a worker sees: few UAs make most of the traffic), and with a warm cache,

each with its ratio to the baseline, measured in the same run on the same chunks of
input, taken in turn.

    .venv/bin/python benchmarks/device.py [--file shared/ua/device-types.tsv] [--rounds 3]
        [--events 20000] [--errors 0]
"""

from __future__ import annotations

import argparse
import collections
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import user_agents  # noqa: E402
from ua_parser import user_agent_parser  # noqa: E402

from processors.device import DEVICE_TYPES, DeviceDetector  # noqa: E402

DEFAULT_FILE = ROOT.parent / "shared" / "ua" / "device-types.tsv"


def load(path: Path) -> list[tuple[str, str]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if header[:2] != ["user_agent", "device_type"]:
            raise SystemExit(f"{path}: expected header user_agent<TAB>device_type")
        for line in f:
            ua, _, label = line.rstrip("\n").rpartition("\t")
            if ua:
                rows.append((ua, label))
    return rows


def accuracy(rows: list[tuple[str, str]], show_errors: int) -> None:
    detector = DeviceDetector(cache_size=0)
    predicted = [detector.detect(ua).device_type for ua, _ in rows]
    labels = [label for _, label in rows]
    classes = list(DEVICE_TYPES)
    confusion = collections.Counter(zip(labels, predicted))
    correct = sum(confusion[(c, c)] for c in classes)
    print(f"accuracy: {correct / len(rows):.2%}  ({correct}/{len(rows)})\n")

    print(f"{'class':<8} {'support':>7} {'precision':>9} {'recall':>7} {'f1':>6}")
    for c in classes:
        tp = confusion[(c, c)]
        support = sum(1 for label in labels if label == c)
        guessed = sum(1 for p in predicted if p == c)
        precision = tp / guessed if guessed else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        print(f"{c:<8} {support:>7} {precision:>9.1%} {recall:>7.1%} {f1:>6.1%}")

    shown = classes + ([None] if any(p is None for p in predicted) else [])
    print("\nconfusion (rows: label, columns: predicted)")
    print(" " * 8 + "".join(f"{str(p):>9}" for p in shown))
    for c in classes:
        print(f"{c:<8}" + "".join(f"{confusion[(c, p)]:>9}" for p in shown))

    if show_errors:
        print(f"\nfirst {show_errors} errors:")
        errors = [(label, p, ua) for (ua, label), p in zip(rows, predicted) if label != p]
        for label, p, ua in errors[:show_errors]:
            print(f"  {label:>7} -> {str(p):<7} {ua[:150]}")


def _interleaved(runs: dict, items: list[str], chunk: int = 100) -> dict[str, float]:
    """Items per second of each function in ``runs``, timed chunk by chunk in turn so
    that machine noise hits all of them alike."""
    # ua-parser keeps a small dict cache of its own (200 entries, cleared when full),
    # shared by everything calling it: give each run its own so none feeds another.
    caches = {name: {} for name in runs}
    seconds = dict.fromkeys(runs, 0.0)
    saved = user_agent_parser._PARSE_CACHE
    try:
        for i in range(0, len(items), chunk):
            part = items[i : i + chunk]
            for name, fn in runs.items():
                user_agent_parser._PARSE_CACHE = caches[name]
                start = time.perf_counter()
                for item in part:
                    fn(item)
                seconds[name] += time.perf_counter() - start
    finally:
        user_agent_parser._PARSE_CACHE = saved
    return {name: len(items) / s for name, s in seconds.items()}


def speed(rows: list[tuple[str, str]], rounds: int, events: int) -> None:
    unique = list(dict.fromkeys(ua for ua, _ in rows))
    # A Zipf-like stream: the k-th most common UA appears ~1/k as often.
    rng = random.Random(42)
    stream = rng.choices(unique, weights=[1 / (k + 1) for k in range(len(unique))], k=events)

    results: dict[str, list[float]] = collections.defaultdict(list)
    for _ in range(rounds):
        rng.shuffle(unique)
        cold = _interleaved({"bare": user_agents.parse, "cold": DeviceDetector(cache_size=0).detect}, unique)
        warm = DeviceDetector(cache_size=10_000)
        for ua in unique:
            warm.detect(ua)
        hot = _interleaved(
            {
                "bare": user_agents.parse,
                "stream": DeviceDetector(cache_size=10_000).detect,
                "warm": warm.detect,
            },
            stream,
        )
        results["bare_unique"].append(cold["bare"])
        results["cold"].append(cold["cold"])
        results["cold_ratio"].append(cold["cold"] / cold["bare"])
        results["bare_stream"].append(hot["bare"])
        for key in ("stream", "warm"):
            results[key].append(hot[key])
            results[f"{key}_ratio"].append(hot[key] / hot["bare"])

    median = {k: statistics.median(v) for k, v in results.items()}
    print(f"\nspeed, UAs/s (median of {rounds} rounds; ratio = detector / bare user_agents.parse, same chunks)")
    lines = [
        (f"bare user_agents.parse, {len(unique)} distinct UAs", "bare_unique", None),
        ("DeviceDetector(cache_size=0): every UA parsed + classified", "cold", "cold_ratio"),
        (f"bare user_agents.parse, Zipf stream of {events} events", "bare_stream", None),
        ("DeviceDetector(10_000), same stream, cache starting empty", "stream", "stream_ratio"),
        ("DeviceDetector(10_000), same stream, cache warm", "warm", "warm_ratio"),
    ]
    for title, key, ratio in lines:
        shown = f"   ratio {median[ratio]:8.2f}" if ratio else ""
        print(f"  {title:<60} {median[key]:>11,.0f}{shown}")
    print(f"  (the stream has {len(set(stream))} distinct UAs: at best {1 - len(set(stream)) / len(stream):.1%} hits)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE, help="TSV: user_agent<TAB>device_type")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--events", type=int, default=20_000, help="length of the Zipf event stream")
    parser.add_argument("--errors", type=int, default=0, help="print this many misclassified UAs")
    args = parser.parse_args()

    rows = load(args.file)
    print(f"{args.file}: {len(rows)} user agents")
    accuracy(rows, args.errors)
    speed(rows, args.rounds, args.events)


if __name__ == "__main__":
    main()
