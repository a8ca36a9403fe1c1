"""Render an evaluation (`dermsight.evaluation.evaluate`) as report.json and a self-contained
report.html: figures are inline PNGs (matplotlib, Agg canvas), thumbnails inline JPEGs, the CSS
inline; the page loads nothing from anywhere and opens offline."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from dermsight.data.schema import CLASS_NAMES
from dermsight.imaging.decode import ImageError, decode_file

DISCLAIMER = (
    "Decision support, not a diagnosis. These figures describe how the model ranked and classified the "
    "images of this data set. They do not replace examination by a clinician, and they need not hold for "
    "other populations, cameras or clinical settings."
)
THUMBNAIL_SIDE = 180
COLOURS = {"line": "#1f5f8b", "point": "#c0392b", "grid": "#d9dee3", "muted": "#7f8c8d"}


# --------------------------------------------------------------------------------------------
# Formatting


def _esc(value) -> str:
    return html.escape("" if value is None else str(value))


def _num(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _pct(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.{digits}f}%"


def _ci(entry: dict | None, fmt=_num) -> str:
    if not entry or entry.get("value") is None:
        return "–"
    text = fmt(entry["value"])
    if entry.get("ci_low") is not None and entry.get("ci_high") is not None:
        text += f' <span class="ci">95% CI {fmt(entry["ci_low"])}–{fmt(entry["ci_high"])}</span>'
    return text


# --------------------------------------------------------------------------------------------
# Figures


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
    curve, point, melanoma = result["curves"]["roc"], result["curves"]["operating_point"], result["melanoma"]
    figure = _figure()
    axes = figure.add_subplot()
    axes.axhspan(0.8, 1.0, color="#eaf2f8", zorder=0, label="pAUC region (sensitivity ≥ 80%)")
    axes.plot([0, 1], [0, 1], linestyle="--", color=COLOURS["muted"], linewidth=1, label="chance")
    label = f"melanoma, AUC {_num(melanoma['auc']['value'])}"
    axes.plot(curve["fpr"], curve["tpr"], color=COLOURS["line"], linewidth=2, label=label)
    if point["fpr"] is not None and point["tpr"] is not None:
        axes.plot(point["fpr"], point["tpr"], "o", color=COLOURS["point"], markersize=8, zorder=5,
                  label=f"threshold {point['threshold']:.4f}")
        axes.annotate(
            f"sens {_pct(point['tpr'])}\nspec {_pct(1 - point['fpr'])}",
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
    curve, point, melanoma = result["curves"]["pr"], result["curves"]["operating_point"], result["melanoma"]
    prevalence = result["data"]["melanomas"] / result["data"]["images"]
    figure = _figure()
    axes = figure.add_subplot()
    axes.axhline(prevalence, linestyle="--", color=COLOURS["muted"], linewidth=1, label=f"prevalence {_pct(prevalence)}")
    axes.plot(curve["recall"], curve["precision"], color=COLOURS["line"], linewidth=2,
              label=f"melanoma, AP {_num(melanoma['average_precision']['value'])}", drawstyle="steps-post")
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
    bins = result["calibration"]["reliability"]
    figure = _figure(5.0, 4.6)
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1], "hspace": 0.08})
    top.plot([0, 1], [0, 1], linestyle="--", color=COLOURS["muted"], linewidth=1, label="perfect calibration")
    filled = [b for b in bins if b["count"]]
    x, y = [b["mean_predicted"] for b in filled], [b["observed"] for b in filled]
    top.plot(x, y, "-", color=COLOURS["line"], linewidth=1.2, alpha=0.6)
    sizes = [12 + 180 * math.sqrt(b["count"] / max(c["count"] for c in filled)) for b in filled]
    top.scatter(x, y, s=sizes, color=COLOURS["line"], zorder=3,
                label=f"melanoma risk, ECE {_num(result['calibration']['ece_melanoma'])}")
    top.set_xlim(0, 1)
    top.set_ylim(-0.02, 1.02)
    _style(top, "", "observed melanoma rate")
    top.set_title("Reliability diagram: melanoma risk", fontsize=11)
    top.legend(loc="upper left", fontsize=8, frameon=False, markerscale=0.5)
    bottom.bar([b["bin_centre"] for b in bins], [b["count"] for b in bins], width=0.09, color="#aab7c4")
    _style(bottom, "predicted melanoma risk (10 bins)", "images")
    return _png(figure)


def _thumbnail(ref) -> str | None:
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


# --------------------------------------------------------------------------------------------
# HTML

CSS = """
:root { --ink:#1b2631; --muted:#5d6d7e; --line:#d9dee3; --accent:#1f5f8b; --warn:#b9770e; --bad:#c0392b; --ok:#1e8449; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: var(--ink); background: #f4f6f8; }
main { max-width: 1120px; margin: 0 auto; padding: 28px 32px 48px; background: white; min-height: 100vh; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 6px; }
p { margin: 6px 0 10px; }
.sub { color: var(--muted); font-size: 13.5px; }
.notice { border-left: 5px solid var(--bad); background: #fdf2f0; padding: 10px 14px; margin: 16px 0; font-size: 14px; }
.notice strong { color: var(--bad); }
.cards { display: grid; grid-template-columns: repeat(3, 1fr); gap: 12px; margin: 14px 0; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; }
.card .label { font-size: 12.5px; color: var(--muted); text-transform: uppercase; letter-spacing: .03em; }
.card .value { font-size: 24px; font-weight: 600; }
.card .ci { display: block; font-size: 12.5px; font-weight: normal; color: var(--muted); }
.ci { color: var(--muted); font-size: 12.5px; white-space: nowrap; }
.verdict { padding: 8px 12px; border-radius: 6px; margin: 8px 0; }
.verdict.ok { background: #e9f7ef; border: 1px solid #a9dfbf; }
.verdict.bad { background: #fef5e7; border: 1px solid #f5cba7; }
.warnings { background: #fef9e7; border: 1px solid #f9e79f; padding: 8px 12px 8px 30px; border-radius: 6px; }
.stack figure { max-width: 720px; margin: 0 auto 8px; }
@media (max-width: 760px) { .cards { grid-template-columns: 1fr 1fr; } }
.figures { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 16px; align-items: start; }
figure { margin: 0; text-align: center; }
figure img { max-width: 100%; height: auto; }
figcaption { font-size: 13px; color: var(--muted); margin-top: 4px; }
table { border-collapse: collapse; width: 100%; margin: 8px 0 14px; font-size: 13.5px; }
th, td { padding: 5px 9px; border-bottom: 1px solid var(--line); text-align: right; vertical-align: top; }
th { background: #f0f3f6; font-weight: 600; }
th:first-child, td:first-child, td.text, th.text { text-align: left; }
tr.group td { background: #f7f9fa; font-weight: 600; text-align: left; }
tr.small td { color: #95a5a6; }
.badge { display: inline-block; font-size: 11.5px; padding: 1px 7px; border-radius: 10px; font-weight: 600; white-space: nowrap; }
.badge.small { background: #fdebd0; color: var(--warn); }
.badge.missed { background: #fadbd8; color: var(--bad); }
.badge.caught { background: #d5f5e3; color: var(--ok); }
.thumbs { display: grid; grid-template-columns: repeat(4, 1fr); gap: 12px; }
.thumb { border: 1px solid var(--line); border-radius: 8px; padding: 6px; font-size: 12.5px; text-align: center; }
.thumb img { width: 100%; max-width: 180px; height: auto; border-radius: 4px; display: block; margin: 0 auto 4px; }
.thumb .noimg { height: 120px; display: flex; align-items: center; justify-content: center; background: #f0f3f6; color: var(--muted); border-radius: 4px; margin-bottom: 4px; }
code { font-size: 12.5px; background: #f0f3f6; padding: 1px 4px; border-radius: 3px; }
footer { margin-top: 36px; font-size: 12.5px; color: var(--muted); border-top: 1px solid var(--line); padding-top: 10px; }
"""


def _card(label: str, value: str, note: str = "") -> str:
    note_html = f'<span class="ci">{note}</span>' if note else ""
    return f'<div class="card"><div class="label">{_esc(label)}</div><div class="value">{value}</div>{note_html}</div>'


def _card_ci(label: str, entry: dict | None, fmt=_num, note: str = "") -> str:
    if not entry or entry.get("value") is None:
        return _card(label, "–", note)
    interval = ""
    if entry.get("ci_low") is not None and entry.get("ci_high") is not None:
        interval = f'<span class="ci">95% CI {fmt(entry["ci_low"])}–{fmt(entry["ci_high"])}</span>'
    return _card(label, fmt(entry["value"]) + interval, note)


def _table(headers: list[str], rows: list[list[str]], text_columns: tuple[int, ...] = (0,)) -> str:
    """Cells are HTML (escape before); columns in `text_columns` align left, the rest (numbers) right."""

    def css(i: int) -> str:
        return ' class="text"' if i in text_columns else ""

    head = "".join(f"<th{css(i)}>{_esc(h)}</th>" for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f"<td{css(i)}>{cell}</td>" for i, cell in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _headline(result: dict) -> str:
    melanoma, multiclass, check = result["melanoma"], result["multiclass"], result["threshold_check"]
    target = check.get("target_sensitivity")
    cards = [
        _card_ci("Melanoma AUC", melanoma["auc"]),
        _card_ci("Sensitivity at threshold", melanoma["sensitivity"], _pct, f"target {_pct(target, 0)}" if target else ""),
        _card_ci("Specificity at threshold", melanoma["specificity"], _pct),
        _card_ci("pAUC above 80% sensitivity", melanoma["pauc_80"], note="ISIC 2024 metric, max 0.200"),
        _card_ci(
            "Balanced accuracy",
            {**multiclass["balanced_accuracy_ci"], "value": result["official"]["balanced_accuracy"]},
            note=f"{len(multiclass['classes'])} classes, official ISIC scorer",
        ),
        _card("Calibration error (ECE)", _num(result["calibration"]["ece_melanoma"]), "melanoma risk, 10 bins"),
    ]
    return f'<div class="cards">{"".join(cards)}</div>'


def _pair(entry: dict, a: str, b: str) -> str:
    return f"{entry.get(a, '–')} / {entry.get(b, '–')}"


def _threshold_section(result: dict) -> str:
    check, melanoma, calibration = result["threshold_check"], result["melanoma"], result["calibration"]
    ok = check.get("holds")
    verdict = f'<div class="verdict {"ok" if ok else "bad"}"><strong>Operating threshold:</strong> {_esc(check["verdict"])}</div>'
    here = check.get("here") or {}
    rows = [
        ["melanoma threshold", _num(check["threshold"], 4), "", _num(here.get("threshold"), 4)],
        ["sensitivity", _pct(check.get("validation_sensitivity")), _ci(check["sensitivity"], _pct), _pct(here.get("sensitivity"))],
        ["specificity", _pct(check.get("validation_specificity")), _ci(check["specificity"], _pct), _pct(here.get("specificity"))],
        ["melanomas caught / missed", "", f"{melanoma['tp']} / {melanoma['fn']}", _pair(here, "tp", "fn")],
        ["other lesions flagged / cleared", "", f"{melanoma['fp']} / {melanoma['tn']}", _pair(here, "fp", "tn")],
        ["PPV / NPV", "", f"{_pct(melanoma['ppv'])} / {_pct(melanoma['npv'])}", f"{_pct(here.get('ppv'))} / {_pct(here.get('npv'))}"],
    ]
    table = _table(
        ["", "bundle (its validation)", "this evaluation, at the bundle threshold",
         f"threshold reaching {_pct(check.get('target_sensitivity'), 0)} here"],
        rows,
    )
    calibration_rows = [
        ["temperature (bundle)", _num(calibration["temperature"], 3)],
        ["ECE, melanoma risk", _num(calibration["ece_melanoma"])],
        ["ECE, top-label (multi-class)", _num(calibration["ece_top_label"])],
        ["Brier score, melanoma risk", _num(calibration["brier_melanoma"])],
        ["mean predicted melanoma risk", _pct(calibration["mean_melanoma_risk"])],
        ["observed melanoma rate", _pct(calibration["melanoma_rate"])],
    ]
    return (
        "<h2>Operating threshold and calibration</h2>"
        + verdict
        + "<p class=\"sub\">The bundle's threshold was chosen on its out-of-fold predictions to reach the target "
        "sensitivity. A case is flagged when its melanoma risk is at or above it.</p>"
        + table
        + '<div class="figures"><div>'
        + _table(["calibration", "value"], calibration_rows)
        + "<p class=\"sub\">ECE: the count-weighted mean gap between predicted risk and observed rate over ten bins "
        "(0 = perfectly calibrated). The risk is a temperature-scaled softmax; with a class mix unlike the training "
        "data, expect a shift.</p></div>"
        + f'<figure><img alt="reliability diagram" src="{reliability_figure(result)}"><figcaption>Observed melanoma rate '
        "per bin of predicted risk (dot area: images in the bin; bars: the same counts).</figcaption></figure></div>"
    )


def _classes_section(result: dict) -> str:
    multiclass = result["multiclass"]
    rows = [
        [
            f"<strong>{_esc(code)}</strong> {_esc(row.get('name', CLASS_NAMES.get(code, '')))}"
            + ("" if row.get("predicted_by_bundle", True) else ' <span class="badge small">not a bundle class</span>'),
            f"{row['support']:,}",
            _pct(row["recall"]),
            _pct(row["precision"]),
            _num(row["auc"]),
            _num(row.get("average_precision")),
        ]
        for code, row in multiclass["per_class"].items()
    ]
    excluded = multiclass.get("excluded_unk", 0)
    note = (
        f"<p class=\"sub\">{excluded:,} image(s) labelled UNK (benign, no specific diagnosis) are not in the multi-class "
        "table; they count as non-melanoma above and as an all-zero row for the official scorer.</p>"
        if excluded
        else ""
    )
    return (
        "<h2>Classes</h2>"
        f"<p class=\"sub\">Arg-max predictions over {len(multiclass['classes'])} classes: accuracy {_pct(multiclass['accuracy'])}, "
        f"balanced accuracy {_pct(multiclass['balanced_accuracy'])}, macro one-vs-rest AUC {_num(multiclass['macro_auc'])}.</p>"
        + '<div class="stack">'
        + f'<figure><img alt="confusion matrix" src="{confusion_figure(result)}"><figcaption>Counts and share of each true '
        "class (rows).</figcaption></figure><div>"
        + _table(["class", "support", "recall", "precision", "AUC", "AP"], rows)
        + "<p class=\"sub\">Recall = sensitivity for the class; AUC one-vs-rest; AP = average precision "
        "(official ISIC scorer). – = undefined (no images of the class, or none predicted).</p>"
        + note
        + "</div></div>"
    )


def _align(i: int) -> str:
    return ' class="text"' if i in (0, 6) else ""


def _subgroup_section(result: dict) -> str:
    subgroups = result["subgroups"]
    titles = {"all": "All images", "sex": "Sex", "age_band": "Age band (years)", "site": "Anatomical site", "source": "Source"}
    rows_html = []
    current = None
    for row in subgroups["rows"]:
        if row["variable"] != current:
            current = row["variable"]
            rows_html.append(f'<tr class="group"><td colspan="7">{_esc(titles.get(current, current))}</td></tr>')
        flag = '<span class="badge small">too small</span>' if row["too_small"] else ""
        cells = [
            _esc(row["value"]),
            f"{row['n']:,}",
            f"{row['positives']:,}",
            _num(row["auc"]),
            _pct(row["sensitivity"]),
            _pct(row["specificity"]),
            flag,
        ]
        css = ' class="small"' if row["too_small"] else ""
        rows_html.append(f"<tr{css}>" + "".join(f"<td{_align(i)}>{c}</td>" for i, c in enumerate(cells)) + "</tr>")
    headers = ["group", "images", "melanomas", "AUC", "sensitivity", "specificity", ""]
    head = "".join(f"<th{_align(i)}>{h}</th>" for i, h in enumerate(headers))
    return (
        "<h2>Subgroups</h2>"
        f"<p class=\"sub\">Melanoma detection per group at the bundle threshold. Groups with fewer than "
        f"{subgroups['min_count']} images or {subgroups['min_positives']} melanomas are flagged <em>too small</em>: "
        "their numbers are too uncertain to compare.</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows_html)}</tbody></table>"
    )


def _false_negative_section(result: dict) -> str:
    worst = result.get("worst_false_negatives") or []
    if not worst:
        return ""
    threshold = result["threshold_check"]["threshold"]
    missed = sum(w["missed"] for w in worst)
    cards = []
    for case in worst:
        src = _thumbnail(case.get("image_ref"))
        picture = f'<img alt="{_esc(case["image"])}" src="{src}">' if src else '<div class="noimg">image not available</div>'
        badge = '<span class="badge missed">missed</span>' if case["missed"] else '<span class="badge caught">flagged</span>'
        where = " · ".join(_esc(v) for v in (case.get("source"), case.get("lesion_id") or case.get("patient_id")) if v)
        cards.append(
            f'<div class="thumb">{picture}<div><strong>{_esc(case["image"])}</strong></div>'
            f'<div>risk {_num(case["melanoma_risk"], 4)} {badge}</div>'
            f'<div class="sub">predicted {_esc(case["predicted_class"])}{" · " + where if where else ""}</div></div>'
        )
    return (
        "<h2>Lowest-risk melanomas</h2>"
        f"<p class=\"sub\">The {len(worst)} melanomas the model rated least likely; {missed} of them fall below the "
        f"threshold {threshold:.4f} and would not have been flagged. Review them for what the model misses.</p>"
        f'<div class="thumbs">{"".join(cards)}</div>'
    )


def _cv_section(result: dict) -> str:
    cv = result.get("cross_validation")
    if not cv:
        return ""
    rows = [
        [f"fold {f['fold']}", f"{f['images']:,}", f"{f['melanomas']:,}", _num(f["melanoma_auc"]), _pct(f["balanced_accuracy"])]
        for f in cv["per_fold"]
    ]
    summary = cv["fold_summary"]
    auc, bacc = summary.get("melanoma_auc") or {}, summary.get("balanced_accuracy") or {}
    rows.append([
        "<strong>mean ± sd</strong>", "", "",
        f"<strong>{_num(auc.get('mean'))} ± {_num(auc.get('sd'))}</strong>",
        f"<strong>{_pct(bacc.get('mean'))} ± {_pct(bacc.get('sd'))}</strong>",
    ])
    return (
        "<h2>Cross-validation folds</h2>"
        f"<p class=\"sub\">{_esc(cv['validation'])}: each image was scored by a model that never saw its patient or "
        f"lesion. Note: {_esc(cv['note'])}, so the threshold check above is optimistic.</p>"
        + _table(["fold", "images", "melanomas", "melanoma AUC", "balanced accuracy"], rows)
    )


def _sources_section(result: dict) -> str:
    """The headline: each source with how it was held out, sources the model never saw first."""
    rows = result.get("per_source") or []
    if not rows:
        return ""
    never_seen = [r for r in rows if r["held_out"] in ("left_out_source", "external_source")]
    lead = (
        "A clinic with its own dermatoscope should expect the first rows: sources no network that scored them ever "
        "saw. Grouped cross-validation within a source (further down) is optimistic: the network learned that "
        "source's look and class mix."
        if never_seen
        else "No source here was held out whole: these are within-source figures, optimistic for a new clinic."
    )
    table_rows = [
        [
            f"{_esc(r['name'])}<br><span class=\"ci\">{_esc(r['held_out_meaning'])}</span>",
            f"{r['images']:,}",
            f"{r['melanomas']:,}",
            _ci(r.get("auc")),
            _pct((r.get("sensitivity") or {}).get("value")),
            _pct((r.get("specificity") or {}).get("value")),
            _pct(r["flagged"]),
            f"{_pct(r['mean_risk'])} / {_pct(r['melanoma_rate'])}",
            _num(r["ece_melanoma"]),
            _num(r.get("balanced_accuracy")),
        ]
        for r in rows
    ]
    headers = ["source", "images", "melanomas", "melanoma AUC", "sensitivity", "specificity", "flagged",
               "mean risk / melanoma rate", "ECE", "balanced accuracy"]
    parts = ["<h2>Sources the model never saw</h2>", f'<p class="sub">{_esc(lead)}</p>', _table(headers, table_rows)]
    sweep = result.get("robustness", {}).get("sweep")
    if sweep:
        parts.append(f'<figure><img alt="acquisition sweep" src="{sweep_figure(sweep)}"><figcaption>The same held-out '
                     "images re-encoded as another camera or archive would: melanoma AUC and the share flagged. "
                     "A model that reads the lesion keeps both flat.</figcaption></figure>")
    return "".join(parts)


def sweep_figure(sweep: list[dict]) -> str:
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


def _ignored_section(result: dict) -> str:
    ignored = result["ignored"]
    parts = ["<h2>Rows left out</h2>"]
    total = ignored["prediction_rows"]
    if ignored["reasons"]:
        parts.append(
            f"<p>{ignored['rows']:,} of {total:,} prediction rows were left out of the evaluation; "
            f"{result['data']['images']:,} were evaluated.</p>"
        )
        rows = [
            [f"<code>{_esc(r['reason'])}</code>", f"{r['rows']:,}", _esc(r["description"]),
             _esc(", ".join(r.get("details") or r["examples"]))]
            for r in ignored["reasons"]
        ]
        parts.append(_table(["reason", "rows", "what it means", "examples"], rows, text_columns=(0, 2, 3)))
    else:
        parts.append(f"<p>No prediction row was left out: all {total:,} were evaluated.</p>")
    truth = ignored.get("truth_rows_not_evaluated") or {}
    if truth.get("rows"):
        detail = []
        if truth.get("prediction_left_out"):
            detail.append(f"{truth['prediction_left_out']:,} whose prediction was left out (above)")
        if truth.get("no_prediction"):
            missing = f"{truth['no_prediction']:,} without any prediction"
            reasons = [f"{truth['unlabelled']:,} of them unlabelled"] if truth.get("unlabelled") else []
            if truth.get("no_image"):
                reasons.append(f"{truth['no_image']:,} without an image file")
            detail.append(missing + (f" ({', '.join(reasons)})" if reasons else ""))
        parts.append(f"<p class=\"sub\">{truth['rows']:,} truth record(s) were not evaluated: {'; '.join(detail)}.</p>")
    if truth.get("without_image_id"):
        parts.append(f"<p class=\"sub\">{truth['without_image_id']:,} truth row(s) without an image id could not be matched.</p>")
    if truth.get("duplicate_rows_merged"):
        parts.append(f"<p class=\"sub\">{truth['duplicate_rows_merged']:,} duplicate truth row(s) merged (one row per image).</p>")
    reading = ignored.get("while_reading") or {}
    if reading:
        text = ", ".join(f"{n:,} {_esc(kind)}" for kind, n in reading.items())
        parts.append(f"<p class=\"sub\">Skipped while reading the data sources (records, or whole files): {text}.</p>")
    return "".join(parts)


def render_html(result: dict) -> str:
    bundle, data = result["bundle"], result["data"]
    mode = "grouped cross-validation (out-of-fold predictions)" if result["mode"] == "cross-validation" else "held-out data"
    sources = ", ".join(f"{_esc(k)} {v:,}" for k, v in data["sources"].items())
    warnings = "".join(f"<li>{_esc(w)}</li>" for w in result.get("warnings") or [])
    dermoscopic = data.get("not_dermoscopic")
    notes = []
    if dermoscopic:
        notes.append(f"{dermoscopic:,} evaluated image(s) did not look dermoscopic to the bundle's out-of-distribution gate.")
    intro = (
        f"<p><strong>{data['images']:,}</strong> images ({data['melanomas']:,} melanomas) from {sources}; "
        f"intervals are 95% bootstrap intervals over {_esc(data['bootstrap_unit'])}s "
        f"({data['groups']:,} groups, {result['melanoma']['bootstrap_resamples']:,} resamples).</p>"
    )
    body = [
        "<header><h1>DermSight evaluation report</h1>",
        f'<p class="sub">Model <strong>{_esc(bundle["name"])}</strong> ({_esc(bundle["version"])}) · {mode} · '
        f"created {_esc(result['created'])}</p></header>",
        f'<div class="notice"><strong>Decision support, not a diagnosis.</strong> {_esc(DISCLAIMER.split(". ", 1)[1])}</div>',
        "<h2>Summary</h2>",
        intro,
        _sources_section(result),
        "<h2>All evaluated images, pooled</h2>" if result.get("per_source") else "",
        _headline(result),
        f'<ul class="warnings">{warnings}</ul>' if warnings else "",
        "".join(f'<p class="sub">{_esc(n)}</p>' for n in notes),
        "<h2>Melanoma detection</h2>",
        '<div class="figures">',
        f'<figure><img alt="ROC curve" src="{roc_figure(result)}"><figcaption>Red dot: the bundle\'s operating threshold. '
        "Shaded: the region the ISIC 2024 partial AUC covers.</figcaption></figure>",
        f'<figure><img alt="precision-recall curve" src="{pr_figure(result)}"><figcaption>Dashed: a model without skill '
        "(the melanoma prevalence).</figcaption></figure>",
        "</div>",
        _threshold_section(result),
        _classes_section(result),
        _subgroup_section(result),
        _cv_section(result),
        _false_negative_section(result),
        _ignored_section(result),
        "<footer>"
        f"<p>{_esc(DISCLAIMER)}</p>"
        "<p>Metrics: official ISIC challenge scorer (isic-challenge-scoring) for balanced accuracy and per-class AP; "
        "melanoma AUC, partial AUC (ISIC 2024), sensitivity and specificity with cluster-bootstrap intervals "
        "(images of one patient or lesion resampled together). Probabilities are compared at 6 decimals, as the "
        "prediction CSV stores them. The full numbers are in report.json beside this file.</p>"
        "</footer>",
    ]
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>DermSight evaluation · {_esc(bundle['name'])}</title><style>{CSS}</style></head>"
        f"<body><main>{''.join(body)}</main></body></html>\n"
    )


def write_report(result: dict, output: Path | str) -> dict[str, Path]:
    """Write report.json and report.html into `output` (created); returns their paths."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = {"json": output / "report.json", "html": output / "report.html"}
    paths["json"].write_text(json.dumps(result, indent=1, allow_nan=False))
    paths["html"].write_text(render_html(result), encoding="utf-8")
    return paths
