"""Reporting: console tables, vLLM-keyed JSON, CSV, a PNG plot and an HTML page."""

from __future__ import annotations

import base64
import csv
import html
import importlib.util
import io
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from loadgen.runner import LevelResult
from loadgen.summary import Goodput, by_backend, percentile, summarize

CSV_FIELDS = (
    "label", "max_concurrency", "request_rate", "completed", "failed", "duration",
    "request_throughput", "output_throughput", "total_token_throughput", "mean_ttft_ms",
    "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "mean_itl_ms",
    "p99_itl_ms", "mean_e2el_ms", "p99_e2el_ms", "request_goodput", "estimated_requests",
    "output_tokens_counted_by",
)


def result_json(level: LevelResult, percentiles: list[float],
                goodput: Goodput | None = None) -> dict[str, Any]:
    """One level's result with `vllm bench serve --save-result` key names."""
    chat = level.workload.endpoint == "chat"
    out: dict[str, Any] = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "endpoint_type": "openai-chat" if chat else "openai",
        "backend": "openai-chat" if chat else "openai",
        "label": level.target.name,
        "url": level.target.url,
        "model_id": level.workload.model,
        "tokenizer_id": level.workload.tokenizer,
        "num_prompts": len(level.records),
        "request_rate": "inf" if level.rate is None else level.rate,
        "burstiness": 1.0,
        "max_concurrency": level.concurrency,
        "input_len": level.workload.input_len,
        "output_len": level.workload.output_len,
    }
    out |= summarize(level.records, level.duration, level.started, percentiles, goodput)
    if out["estimated_requests"]:
        out["output_tokens_counted_by"] = (
            "tokenizer" if level.workload.tokenizer else "content_events")
    else:
        out["output_tokens_counted_by"] = "usage"
    out["rtfx"] = 0.0  # audio real-time factor in vLLM; not applicable to text
    out["queue_times"] = [r.queue_time for r in level.records]
    out["latencies"] = [r.e2el for r in level.records if r.ok]
    out["backends"] = by_backend(level.records, level.duration)
    if level.extra.get("turns"):
        out["agent"] = agent_summary(level)
    return out


def agent_summary(level: LevelResult) -> dict[str, Any]:
    turns: dict[int, list[float]] = {}
    for r in level.records:
        if r.ok and r.ttft is not None:
            turns.setdefault(r.turn, []).append(r.ttft * 1000)
    per_turn = {t: sum(v) / len(v) for t, v in sorted(turns.items())}
    later = sorted(v for t, vs in turns.items() if t > 0 for v in vs)
    return {
        "conversations": level.concurrency,
        "turns": level.extra["turns"],
        "prefix_tokens": level.extra["prefix_tokens"],
        **{key: level.extra.get(key) for key in ("first_turn_tokens", "turn_tokens",
                                                 "reply_tokens", "think_s")},
        "mean_ttft_ms_per_turn": per_turn,
        "mean_ttft_ms_first_turn": per_turn.get(0, 0.0),
        "mean_ttft_ms_later_turns": sum(later) / len(later) if later else 0.0,
        "p50_ttft_ms_later_turns": percentile(later, 50) if later else 0.0,
        "p99_ttft_ms_later_turns": percentile(later, 99) if later else 0.0,
    }


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def level_name(result: dict[str, Any]) -> str:
    if result.get("agent"):
        return f"{result['max_concurrency']} agents"
    if result["request_rate"] != "inf":
        return f"{result['request_rate']:g}/s"
    return str(result["max_concurrency"])


def console(results: list[dict[str, Any]], scale: float = 1.0) -> str:
    """Per target: the main metrics per level; then per-backend tables where the target
    is a sluiceway proxy. `scale` > 1 converts an emulator's --speed back to its profile."""
    header = ["target", "level", "ok", "failed", "req/s", "out tok/s", "TTFT mean",
              "TTFT p99", "TPOT mean", "ITL mean", "E2EL p99"]
    rows = []
    for r in results:
        rows.append([r["label"], level_name(r), str(r["completed"]), str(r["failed"]),
                     _fmt(r["request_throughput"] / scale, 2),
                     _fmt(r["output_throughput"] / scale),
                     _fmt(r["mean_ttft_ms"] * scale, 1) + " ms",
                     _fmt(r.get("p99_ttft_ms", 0.0) * scale, 1) + " ms",
                     _fmt(r["mean_tpot_ms"] * scale, 2) + " ms",
                     _fmt(r["mean_itl_ms"] * scale, 2) + " ms",
                     _fmt(r.get("p99_e2el_ms", 0.0) * scale, 0) + " ms"])
    parts = [table(rows, header)]
    backend_rows = []
    for r in results:
        backends = {k: v for k, v in r["backends"].items() if k != "-"}
        for name, b in backends.items():
            backend_rows.append([r["label"], level_name(r), name, f"{b['share']:.0%}",
                                 str(b["completed"]), str(b["failed"]),
                                 _fmt(b["output_throughput"] / scale),
                                 _fmt(b["mean_ttft_ms"] * scale, 1) + " ms"])
    if backend_rows:
        parts.append("per backend (from x-sluiceway-backend):")
        parts.append(table(backend_rows, ["target", "level", "backend", "share", "ok",
                                          "failed", "out tok/s", "TTFT mean"]))
    failures = [(r["label"], level_name(r), r["failures"]) for r in results if r["failures"]]
    for label, level, counts in failures:
        parts.append(f"failures {label} @ {level}: " +
                     ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    for r in results:
        if r.get("estimated_requests"):
            how = ("by the tokenizer " + str(r["tokenizer_id"])
                   if r["output_tokens_counted_by"] == "tokenizer"
                   else "as one token per content event (--tokenizer PATH counts exactly)")
            parts.append(f"warning: {r['label']} @ {level_name(r)}: {r['estimated_requests']} "
                         f"of {r['completed']} streams carried no usage; their output tokens "
                         f"are estimated {how}")
    for r in results:
        if r.get("agent"):
            agent = r["agent"]
            parts.append(f"agent TTFT per turn, {r['label']}: " + ", ".join(
                f"t{t}={v * scale:,.0f} ms" for t, v in agent["mean_ttft_ms_per_turn"].items())
                + f"; turns 2+: mean {agent['mean_ttft_ms_later_turns'] * scale:,.0f}, "
                f"p50 {agent['p50_ttft_ms_later_turns'] * scale:,.0f}, "
                f"p99 {agent['p99_ttft_ms_later_turns'] * scale:,.0f} ms")
    return "\n\n".join(parts)


def side_by_side(results: list[dict[str, Any]], scale: float = 1.0) -> str:
    """One row per level; output tok/s, failed and mean TTFT for each target."""
    labels = list(dict.fromkeys(r["label"] for r in results))
    levels = list(dict.fromkeys(level_name(r) for r in results))
    index = {(r["label"], level_name(r)): r for r in results}
    header = ["level"]
    for label in labels:
        header += [f"{label} tok/s", "failed", "TTFT"]
    rows = []
    for level in levels:
        row = [level]
        for label in labels:
            r = index.get((label, level))
            if r is None:
                row += ["-", "-", "-"]
                continue
            row += [_fmt(r["output_throughput"] / scale), str(r["failed"]),
                    _fmt(r["mean_ttft_ms"] * scale / 1000, 2) + " s"]
        rows.append(row)
    return table(rows, header)


def write_json(path: Path, results: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    path.write_bytes(orjson.dumps({**meta, "results": results},
                                  option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))


def write_csv(path: Path, results: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in results:
            writer.writerow({k: r.get(k) for k in CSV_FIELDS})


PLOT_MISSING = ("plots need matplotlib, which the container image leaves out: "
                "pip install 'sluiceway[plot]'")


def can_plot() -> bool:
    """matplotlib is installed (the `plot` extra; `make install` has it)."""
    return importlib.util.find_spec("matplotlib") is not None


def plot_png(results: list[dict[str, Any]], scale: float = 1.0) -> bytes:
    """Output tok/s and mean TTFT against concurrency, one line per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label in dict.fromkeys(r["label"] for r in results):
        points = sorted((r["max_concurrency"], r) for r in results
                        if r["label"] == label and r["max_concurrency"] and not r.get("agent"))
        if not points:
            continue
        xs = [c for c, _ in points]
        left.plot(xs, [r["output_throughput"] / scale for _, r in points], marker="o",
                  label=label)
        right.plot(xs, [r["mean_ttft_ms"] * scale / 1000 for _, r in points], marker="o",
                   label=label)
    levels = sorted({r["max_concurrency"] for r in results if r["max_concurrency"]})
    for axis, title in ((left, "output tokens/s"), (right, "mean TTFT (s)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(levels, [str(c) for c in levels])
        axis.set_xlabel("concurrent requests")
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
        axis.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def write_html(path: Path, title: str, png: bytes, text_tables: list[str]) -> None:
    """The tables, under the plot when there is one (`png` empty: no plot)."""
    image = base64.b64encode(png).decode()
    picture = (f"<img alt='throughput and TTFT' src='data:image/png;base64,{image}'>"
               if png else "")
    blocks = "".join(f"<pre>{html.escape(t)}</pre>" for t in text_tables)
    path.write_text(
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}pre{background:#f6f6f6;"
        "padding:1em;overflow-x:auto}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{picture}{blocks}</body></html>",
        encoding="utf-8",
    )
