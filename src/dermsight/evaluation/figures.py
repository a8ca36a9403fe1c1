"""The evaluation report's figures (matplotlib on an Agg canvas) and thumbnails, each as a data
URI that the self-contained report.html inlines."""

from __future__ import annotations

import base64
import io
import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from dermsight.evaluation.formatting import num, pct
from dermsight.imaging.decode import ImageError, decode_file

THUMBNAIL_SIDE = 180
COLOURS = {"line": "#1f5f8b", "point": "#c0392b", "grid": "#d9dee3", "muted": "#7f8c8d"}


def _figure(width: float = 5.0, height: float = 4.2) -> Figure:
    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight", facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _style(axes, xlabel: str, ylabel: str) -> None:
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, color=COLOURS["grid"], linewidth=0.6)
    axes.set_axisbelow(True)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)


def roc_figure(result: dict) -> str:
    """The melanoma ROC curve with the operating point and the pAUC region, as a PNG data URI."""
    curve, point, melanoma = result["curves"]["roc"], result["curves"]["operating_point"], result["melanoma"]
    figure = _figure()
    axes = figure.add_subplot()
    axes.axhspan(0.8, 1.0, color="#eaf2f8", zorder=0, label="pAUC region (sensitivity ≥ 80%)")
    axes.plot([0, 1], [0, 1], linestyle="--", color=COLOURS["muted"], linewidth=1, label="chance")
    label = f"melanoma, AUC {num(melanoma['auc']['value'])}"
    axes.plot(curve["fpr"], curve["tpr"], color=COLOURS["line"], linewidth=2, label=label)
    if point["fpr"] is not None and point["tpr"] is not None:
        axes.plot(point["fpr"], point["tpr"], "o", color=COLOURS["point"], markersize=8, zorder=5,
                  label=f"threshold {point['threshold']:.4f}")
        axes.annotate(
            f"sens {pct(point['tpr'])}\nspec {pct(1 - point['fpr'])}",
            (point["fpr"], point["tpr"]), xytext=(12, -30), textcoords="offset points", fontsize=9,
            color=COLOURS["point"],
        )
    axes.set_xlim(-0.01, 1.01)
    axes.set_ylim(-0.01, 1.01)
    _style(axes, "1 − specificity (false-positive rate)", "sensitivity (true-positive rate)")
    axes.set_title("ROC curve: melanoma vs the rest", fontsize=11)
    axes.legend(loc="lower right", fontsize=8, frameon=False)
    return _png(figure)


def pr_figure(result: dict) -> str:
    """The melanoma precision-recall curve with the operating point and the prevalence, as a PNG data URI."""
    curve, point, melanoma = result["curves"]["pr"], result["curves"]["operating_point"], result["melanoma"]
    prevalence = result["data"]["melanomas"] / result["data"]["images"]
    figure = _figure()
    axes = figure.add_subplot()
    axes.axhline(prevalence, linestyle="--", color=COLOURS["muted"], linewidth=1, label=f"prevalence {pct(prevalence)}")
    axes.plot(curve["recall"], curve["precision"], color=COLOURS["line"], linewidth=2,
              label=f"melanoma, AP {num(melanoma['average_precision']['value'])}", drawstyle="steps-post")
    if point["tpr"] is not None and point["precision"] is not None:
        axes.plot(point["tpr"], point["precision"], "o", color=COLOURS["point"], markersize=8, zorder=5,
                  label=f"threshold {point['threshold']:.4f}")
    axes.set_xlim(-0.01, 1.01)
    axes.set_ylim(-0.01, 1.01)
    _style(axes, "recall (sensitivity)", "precision (PPV)")
    axes.set_title("Precision–recall: melanoma", fontsize=11)
    axes.legend(loc="upper right", fontsize=8, frameon=False)
    return _png(figure)


def confusion_figure(result: dict) -> str:
    """The multi-class confusion matrix (counts and row shares), as a PNG data URI."""
    multiclass = result["multiclass"]
    classes = multiclass["classes"]
    matrix = np.asarray(multiclass["confusion_matrix"], dtype=float)
    support = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, support, out=np.zeros_like(matrix), where=support > 0)
    side = 1.6 + 0.72 * len(classes)
    figure = _figure(side + 1.0, side)
    axes = figure.add_subplot()
    image = axes.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            if support[i, 0] == 0:
                continue
            colour = "white" if share[i, j] > 0.55 else "#1b2631"
            axes.text(j, i, f"{int(matrix[i, j])}\n{share[i, j]:.0%}", ha="center", va="center", fontsize=8.5, color=colour)
    axes.set_xticks(range(len(classes)), classes, fontsize=9)
    axes.set_yticks(range(len(classes)), [f"{c} ({int(support[i, 0])})" for i, c in enumerate(classes)], fontsize=9)
    axes.set_xlabel("predicted class (arg-max)")
    axes.set_ylabel("true class (images)")
    axes.set_title("Confusion matrix (row share = recall)", fontsize=11)
    colourbar = figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    colourbar.ax.tick_params(labelsize=7)
    return _png(figure)


def reliability_figure(result: dict) -> str:
    """The reliability diagram of the melanoma risk with its bin counts, as a PNG data URI."""
    bins = result["calibration"]["reliability"]
    figure = _figure(5.0, 4.6)
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1], "hspace": 0.08})
    top.plot([0, 1], [0, 1], linestyle="--", color=COLOURS["muted"], linewidth=1, label="perfect calibration")
    filled = [b for b in bins if b["count"]]
    x, y = [b["mean_predicted"] for b in filled], [b["observed"] for b in filled]
    top.plot(x, y, "-", color=COLOURS["line"], linewidth=1.2, alpha=0.6)
    sizes = [12 + 180 * math.sqrt(b["count"] / max(c["count"] for c in filled)) for b in filled]
    top.scatter(x, y, s=sizes, color=COLOURS["line"], zorder=3,
                label=f"melanoma risk, ECE {num(result['calibration']['ece_melanoma'])}")
    top.set_xlim(0, 1)
    top.set_ylim(-0.02, 1.02)
    _style(top, "", "observed melanoma rate")
    top.set_title("Reliability diagram: melanoma risk", fontsize=11)
    top.legend(loc="upper left", fontsize=8, frameon=False, markerscale=0.5)
    bottom.bar([b["bin_centre"] for b in bins], [b["count"] for b in bins], width=0.09, color="#aab7c4")
    _style(bottom, "predicted melanoma risk (10 bins)", "images")
    return _png(figure)


def thumbnail(ref) -> str | None:
    """The image behind `ref` as a JPEG data URI at most THUMBNAIL_SIDE pixels a side; None when unreadable."""
    if not ref:
        return None
    try:
        array = decode_file(ref, min_side=THUMBNAIL_SIDE)
    except (ImageError, OSError):
        return None
    image = Image.fromarray(array)
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def sweep_figure(sweep: list[dict]) -> str:
    """Melanoma AUC and the share flagged per acquisition of the robustness sweep, as a PNG data URI."""
    figure = _figure()
    axes = figure.add_subplot()
    names = [s["acquisition"] for s in sweep]
    x = np.arange(len(names))
    axes.plot(x, [s.get("auc") for s in sweep], "o-", color=COLOURS["line"], label="melanoma AUC")
    axes.plot(x, [s["flagged"] for s in sweep], "s--", color=COLOURS["point"], label="share flagged")
    axes.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    axes.set_ylim(0, 1.01)
    _style(axes, "acquisition", "value")
    axes.set_title("Acquisition sweep on held-out images", fontsize=11)
    axes.legend(loc="lower left", fontsize=8, frameon=False)
    figure.tight_layout()
    return _png(figure)
