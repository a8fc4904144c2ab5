"""report.html for the evaluate job, and its table for the terminal: the systems table, judge rates, plots and image grids.

One static page with its files beside it (`report_files/`): open it from disk or any file server.
The grids show each system's top k for the first `evaluate.report_queries` queries, side by side,
with each image's aesthetic score (and on the synthetic world its true aesthetic and whether it
is relevant), so a person can scan what alignment changed. A small script on the page counts
images that failed to load and shows a warning (and `data-images-broken` on <body>), so a broken
report is visible to a reader and to the headless-browser test alike.
"""

from __future__ import annotations

import hashlib
import html
import io as _io

import numpy as np

from align.config import EvaluateConfig
from align.data import tables
from align.data.images import ImageDecodeError, jpeg_thumbnail
from align.evaluation.scoring import Reference
from align.evaluation.systems import System
from align.evaluation.views import tables_of
from align.log import get_logger
from align.runtime.manifest import empty_output_dir
from align.storage import io
from align.train.steps import plot_metrics, read_metrics_jsonl

# matplotlib is imported inside the plotting function (0.5 s here): only the report draws.

log = get_logger("report")
THUMBNAIL = 96

_CHECK_IMAGES = """
<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter((img) => !img.complete || img.naturalWidth === 0);
  document.body.dataset.imagesLoaded = String(images.length - broken.length);
  document.body.dataset.imagesBroken = String(broken.length);
  if (broken.length) {
    const note = document.getElementById("broken");
    note.textContent = broken.length + " image(s) failed to load: " +
      broken.slice(0, 5).map((img) => img.getAttribute("src")).join(", ");
    note.hidden = false;
  }
});
</script>
"""

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.grid { display: flex; gap: 4px; align-items: flex-start; margin: 2px 0 8px; }
.grid figure { margin: 0; width: 96px; font-size: 10px; text-align: center; }
.grid img { width: 96px; height: 96px; display: block; }
.irrelevant img { outline: 3px solid #d33; outline-offset: -3px; }
.system { width: 110px; font-weight: 600; font-size: 12px; padding-top: 40px; }
#broken { background: #fdd; padding: 0.5em; }
"""


def _thumb_name(image_id: str) -> str:
    """A file name for an image id that may hold any character (a path, a URL): stable across
    runs, so a re-run replaces the same files."""
    return hashlib.sha1(str(image_id).encode("utf-8")).hexdigest()[:20] + ".jpg"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "-"


def score_distribution_png(tops: dict[str, np.ndarray], values: dict[str, np.ndarray]) -> bytes:
    """Histograms, one panel per score, of the top-k images of every system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(values), figsize=(5 * len(values), 3.4), squeeze=False)
    for ax, (label, per_image) in zip(axes[0], values.items(), strict=True):
        for name, top in tops.items():
            v = per_image[top[top >= 0]]
            v = v[~np.isnan(v)]
            ax.hist(
                v, bins=20, histtype="step", linewidth=1.5, label=f"{name} (mean {v.mean():.3f})"
            )
        ax.set_title(f"{label} of the top k")
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def write_report(
    ev: EvaluateConfig,
    out: str,
    corpus: str,
    max_pixels: int,
    metrics: dict,
    texts: list[str],
    tops: dict[str, np.ndarray],
    ref: Reference,
    systems: list[System],
) -> None:
    """Write `report.html` and `report_files/` under `out` (replacing an earlier report): the
    tables, the plots and each system's top k for the first `ev.report_queries` queries, whose
    images are read from `corpus` (rows of `tops` index `ref.gallery`)."""
    files = f"{out}/report_files"
    empty_output_dir(files, "evaluate")
    sections = [
        f"<h1>Evaluation: top {ev.k}</h1>",
        '<p id="broken" hidden></p>',
    ]
    sections += table_sections(metrics)
    sections += plot_sections(files, tops, ref, systems)
    shown = range(min(ev.report_queries, len(texts)))
    write_thumbnails(files, corpus, max_pixels, tops, ref.gallery.ids, shown)
    headline = next(iter(tables_of(metrics).values())).get("title")
    sections.append(
        f"<h2>Top results per query{': ' + html.escape(headline) if headline else ''}</h2>"
    )
    for q in shown:
        sections += query_grid(texts[q], q, tops, ref)
    if ref.gt is not None:
        sections.append("<p>A red frame marks an image that does not show what the query asks.</p>")
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>evaluate report</title>"
        f"<style>{_STYLE}</style></head><body>{''.join(sections)}{_CHECK_IMAGES}</body></html>"
    )
    io.write_bytes(f"{out}/report.html", page.encode("utf-8"))


def table_sections(metrics: dict) -> list[str]:
    """Per table (gallery and query split, the headline first): the systems, the judge's rates
    and its agreement with people."""
    sections = []
    for table in tables_of(metrics).values():
        title = table.get("title")
        sections.append(
            f"<h2>Systems: {html.escape(title)} ({table['queries']} queries)</h2>"
            if title
            else "<h2>Systems</h2>"
        )
        sections += one_table_sections({**metrics, **table})
    return sections


def one_table_sections(metrics: dict) -> list[str]:
    """The systems table, the judge's rates and its agreement with people."""
    results = metrics["systems"]
    columns = list(dict.fromkeys(c for m in results.values() for c in m))
    sections = []
    sections.append(
        _table(
            ["system", *columns],
            [[html.escape(n), *(_fmt(m.get(c)) for c in columns)] for n, m in results.items()],
        )
    )
    judge, hpir_agreement = judge_labels(metrics["judge_backend"])
    if metrics["judge"]:
        sections.append(f"<h3>{html.escape(judge[0].upper() + judge[1:])}</h3>")
        if metrics["judge_backend"] == "oracle":
            sections.append(f"<p>{html.escape(ORACLE_NOTE)}</p>")
        rows = [
            [html.escape(p), _fmt(r["win"]), _fmt(r["similar"]), _fmt(r["loss"]), str(r["n"])]
            for p, r in metrics["judge"].items()
        ]
        sections.append(_table(["comparison", "win", "similar", "loss", "queries"], rows))
    if any(v is not None for v in metrics["judge_hpir"].values()):
        sections.append(
            f"<p>{html.escape(hpir_agreement[0].upper() + hpir_agreement[1:])}: "
            + ", ".join(f"{d} {_fmt(v)}" for d, v in metrics["judge_hpir"].items())
            + "</p>"
        )
    return sections


# The synthetic world's judge answers from the ground truth (align/evaluation/metrics.py
# oracle_row_quality): what it prefers is what true_aesthetic@k and true_precision@k measure.
ORACLE_NOTE = (
    "The oracle judge reads the world's ground truth, the quantity true_aesthetic@k and "
    "true_precision@k measure: its verdicts restate those columns query by query and are no "
    "independent evidence. A model judge (evaluate.judge.backend http or vllm) is."
)


def judge_labels(backend: str) -> tuple[str, str]:
    """(what the judge is called, what its HPIR agreement is called) for a judge backend: the
    oracle and the HPIR file's simulated people are two views of one ground truth."""
    if backend == "oracle":
        return (
            "oracle judge (reads the ground truth)",
            "oracle judge agreement with the HPIR file (two views of one ground truth)",
        )
    return f"judge ({backend})", "judge agreement with people on the HPIR file"


def plot_sections(files: str, tops: dict, ref: Reference, systems: list[System]) -> list[str]:
    """Score distributions of each system's top k, then the training curves of each model that
    came out of a training job (metrics.jsonl beside its checkpoint): for the demo, the
    pretrained base and the aligned model."""
    sections = ["<h2>Plots</h2>"]
    per_image = {"combined aesthetic (z)": ref.scores["aesthetic"]}
    if ref.gt is not None:
        per_image["true aesthetic"] = ref.gt.true_aesthetic.astype(np.float64)
    io.write_bytes(f"{files}/scores.png", score_distribution_png(tops, per_image))
    sections.append('<img src="report_files/scores.png" alt="score distributions">')
    curves: dict[str, list[str]] = {}
    for system in systems:
        if system.model.pretrained and "/" in system.model.pretrained:
            run_dir = system.model.pretrained.rsplit("/", 1)[0]
            if io.exists(f"{run_dir}/metrics.jsonl"):
                curves.setdefault(run_dir, []).append(system.name)
    for i, (run_dir, names) in enumerate(curves.items()):
        records = read_metrics_jsonl(io.read_bytes(f"{run_dir}/metrics.jsonl"))
        title = f"training curves of {', '.join(names)} ({run_dir})"
        io.write_bytes(f"{files}/training-{i}.png", plot_metrics(records, title))
        sections.append(f'<img src="report_files/training-{i}.png" alt="{html.escape(title)}">')
    return sections


def write_thumbnails(files: str, corpus: str, max_pixels: int, tops: dict, ids, shown) -> None:
    """A JPEG thumbnail of every image the grids show; one that does not decode is logged and
    left out (the page's script then reports it as broken)."""
    needed = sorted({int(r) for q in shown for top in tops.values() for r in top[q] if r >= 0})
    images = tables.read_image_table(corpus, ids[needed], ["image_id", "image"])
    data = dict(zip(images["image_id"].to_pylist(), images["image"].to_pylist(), strict=True))
    for row in needed:
        try:
            thumb = jpeg_thumbnail(data.get(ids[row]), THUMBNAIL, max_pixels)
        except ImageDecodeError as e:
            log.warning("report: image %s: %s", ids[row], e)
            continue
        io.write_bytes(f"{files}/img/{_thumb_name(ids[row])}", thumb)


def query_grid(text: str, q: int, tops: dict[str, np.ndarray], ref: Reference) -> list[str]:
    """One query's heading and a row of thumbnails per system, each with its scores; an image
    that does not show what the query asks is framed (synthetic world)."""
    sections = [f"<h3>{html.escape(text)}</h3>"]
    ids, gt, aesthetic = ref.gallery.ids, ref.gt, ref.scores["aesthetic"]
    for name, top in tops.items():
        relevant = None
        if gt is not None:
            relevant = gt.relevance(
                {c: ref.facts[c][q : q + 1] for c in ref.facts}, top[q : q + 1]
            )[0]
        figures = []
        for rank, r in enumerate(top[q]):
            if r < 0:
                continue
            label = f"aes {aesthetic[r]:.2f}"
            if gt is not None:
                label += f" true {gt.true_aesthetic[r]:.2f}"
            cls = "" if relevant is None or relevant[rank] else ' class="irrelevant"'
            figures.append(
                f'<figure{cls}><img src="report_files/img/{_thumb_name(ids[r])}" '
                f'alt="{html.escape(str(ids[r]))}">'
                f"<figcaption>{label}</figcaption></figure>"
            )
        sections.append(
            f'<div class="grid"><div class="system">{html.escape(name)}</div>'
            + "".join(figures)
            + "</div>"
        )
    return sections


def format_table(metrics: dict) -> str:
    """Every table (gallery and query split, the headline first) as aligned text, for the
    terminal."""
    blocks = []
    for table in tables_of(metrics).values():
        title = table.get("title")
        head = [f"== {title} ({table['queries']} queries)"] if title else []
        blocks.append("\n".join([*head, format_one_table({**metrics, **table})]))
    return "\n\n".join(blocks)


def format_one_table(metrics: dict) -> str:
    """One systems table (and judge rates) as aligned text."""
    systems = metrics["systems"]
    columns = list(dict.fromkeys(c for m in systems.values() for c in m))
    width = max(len(n) for n in systems) + 2
    lines = ["system".ljust(width) + "".join(c.rjust(max(len(c), 7) + 2) for c in columns)]
    for name, m in systems.items():
        cells = "".join(
            (f"{m[c]:.3f}" if isinstance(m.get(c), float) else "-").rjust(max(len(c), 7) + 2)
            for c in columns
        )
        lines.append(name.ljust(width) + cells)
    judge, hpir_agreement = judge_labels(metrics["judge_backend"])
    for pair, rates in metrics["judge"].items():
        lines.append(
            f"{judge} {pair}: win {rates['win']:.2f}, similar "
            f"{rates['similar']:.2f}, loss {rates['loss']:.2f} over {rates['n']} queries"
        )
    if metrics["judge"] and metrics["judge_backend"] == "oracle":
        lines.append("(the oracle judge restates the true_* columns: no independent evidence)")
    for dim, value in metrics.get("judge_hpir", {}).items():
        if value is not None:
            lines.append(f"{hpir_agreement}, {dim}: {value:.3f}")
    return "\n".join(lines)


def short_metrics(metrics: dict) -> str:
    """The float metrics on one line, for the log."""
    return ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float))
