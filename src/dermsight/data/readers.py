"""One reader per source format; each returns :class:`~dermsight.data.records.Loaded`.

Readers never raise on a bad row or a bad value: they record a Problem and go on.
They raise :class:`SourceError` only when the source as a whole is unusable (no CSV,
a required column missing).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dermsight.data import harmonise
from dermsight.data.records import (
    IMAGE_SUFFIXES,
    Loaded,
    RecordBuilder,
    SourceError,
    attach_images,
    image_index,
    read_csv,
    row_location,
)
from dermsight.data.schema import NINE_CLASS_FOLDERS, Problem

ISIC2020_COLUMNS = ("image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge")


def read_ham10000(folder: Path) -> Loaded:
    """HAM10000: HAM10000_metadata.csv + images/ (or the two Kaggle part folders)."""
    csv_path = folder / "HAM10000_metadata.csv"
    frame = read_csv(csv_path, ("lesion_id", "image_id", "dx", "age", "sex", "localization"))
    images = image_index(
        [folder / "images", folder / "HAM10000_images_part_1", folder / "HAM10000_images_part_2", folder]
    )
    builder = RecordBuilder("ham10000")
    refs = attach_images(builder, frame, "image_id", images, csv_path)
    for i, row in enumerate(frame.itertuples(index=False)):
        builder.add(
            row_location(csv_path, i),
            image_id=row.image_id,
            image_ref=refs[i],
            lesion_id=row.lesion_id,
            age=row.age,
            sex=row.sex,
            site=row.localization,
            label=row.dx,
        )
    return builder.loaded()


def read_isic2020_csv(
    csv_path: Path, image_folders: list[Path] | None = None, patient_images: dict[str, int] | None = None
) -> Loaded:
    """A SIIM-ISIC 2020 metadata CSV (train.csv, test.csv or a subset) and its images.

    Images are looked up in `image_folders`, by default the folders the Kaggle and
    ISIC downloads use: ``<stem>/``, ``jpeg/<stem>/`` and ``<stem>`` DICOM folders.
    `patient_images` gives each patient's image count in the full dataset (a subset CSV
    undercounts); by default it is counted in this CSV.
    """
    frame = read_csv(csv_path, ISIC2020_COLUMNS)
    if patient_images is None:
        patient_images = frame["patient_id"].value_counts().to_dict()
    if image_folders is None:
        image_folders = _isic2020_image_folders(csv_path)
    builder = RecordBuilder("isic2020")
    refs = attach_images(builder, frame, "image_name", image_index(image_folders), csv_path)
    labelled = "target" in frame.columns
    for i, row in enumerate(frame.to_dict("records")):
        label = row.get("diagnosis") or None
        builder.add(
            row_location(csv_path, i),
            image_id=row["image_name"],
            image_ref=refs[i],
            patient_id=row["patient_id"],
            lesion_id=row.get("lesion_id"),
            age=row["age_approx"],
            sex=row["sex"],
            site=row["anatom_site_general_challenge"],
            label=label if labelled else None,
            diagnosis=None if label or not labelled else ("MEL" if row["target"] == "1" else "UNK"),
            melanoma=row["target"] if labelled else None,
            patient_images=patient_images.get(row["patient_id"]),
        )
    return builder.loaded()


def _isic2020_image_folders(csv_path: Path) -> list[Path]:
    return [csv_path.parent / csv_path.stem, csv_path.parent / "jpeg" / csv_path.stem]


def read_isic2020_folder(folder: Path) -> Loaded:
    """Every ISIC 2020 CSV in `folder` that has its images beside it (e.g. train_sample.csv
    + train_sample/). CSVs with no images anywhere are reported and skipped, since the
    shared train.csv/test.csv describe 44k images that are not on disk."""
    loaded = Loaded()
    csvs = []
    for csv_path in sorted(folder.glob("*.csv")):
        try:
            frame = read_csv(csv_path, ())
        except SourceError:
            continue
        if set(ISIC2020_COLUMNS) <= set(frame.columns):
            csvs.append((csv_path, frame))
    found_any = bool(csvs)
    # A patient's image count is taken from the most complete CSV that lists the patient.
    patient_images: dict[str, int] = {}
    for _, frame in csvs:
        for patient, count in frame["patient_id"].value_counts().items():
            patient_images[patient] = max(count, patient_images.get(patient, 0))
    for csv_path, frame in csvs:
        # Look for images before harmonising rows: train.csv, test.csv and the v2 ground
        # truth are 77k rows that would be parsed only to be thrown away.
        if set(image_index(_isic2020_image_folders(csv_path))).isdisjoint(frame["image_name"]):
            loaded.problems.append(
                Problem("no_images", str(csv_path), f"no image files beside it for its {len(frame)} rows; CSV not used", skipped=True)
            )
            continue
        loaded.extend(read_isic2020_csv(csv_path, patient_images=patient_images))
    if loaded.records.empty:
        dicom_folder = next((f for f in (folder, folder / "train") if any(f.glob("*.dcm"))), None)
        if dicom_folder is not None:
            from dermsight.data.dicom import read_dicom_folder

            loaded.extend(read_dicom_folder(dicom_folder))
            found_any = True
    if not found_any:
        raise SourceError(f"{folder}: no ISIC 2020 metadata CSV (columns {', '.join(ISIC2020_COLUMNS)})")
    return loaded


def read_isic2019(folder: Path) -> Loaded:
    """ISIC 2019: ISIC_2019_Training_GroundTruth.csv (one-hot) + ..._Metadata.csv, and the
    ISIC_2019_Training_Input/ images when present."""
    truth_path = folder / "ISIC_2019_Training_GroundTruth.csv"
    truth = read_csv(truth_path, ("image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"))
    meta_path = folder / "ISIC_2019_Training_Metadata.csv"
    metadata = read_csv(meta_path, ("image", "age_approx", "anatom_site_general", "sex")) if meta_path.exists() else None
    meta_by_id = {} if metadata is None else metadata.set_index("image").to_dict("index")
    builder = RecordBuilder("isic2019")
    refs = attach_images(
        builder, truth, "image", image_index([folder / "ISIC_2019_Training_Input", folder / "images"]), truth_path
    )
    for i, row in enumerate(truth.to_dict("records")):
        code = _one_hot_label(builder, row, ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"), truth_path, i)
        if code is None:
            continue
        meta = meta_by_id.get(row["image"], {})
        builder.add(
            row_location(truth_path, i),
            image_id=row["image"],
            image_ref=refs[i],
            lesion_id=meta.get("lesion_id"),
            age=meta.get("age_approx"),
            sex=meta.get("sex"),
            site=meta.get("anatom_site_general"),
            label=code,
        )
    return builder.loaded()


def read_isic2018(folder: Path) -> Loaded:
    """ISIC 2018 Task 3: training/validation one-hot ground truth + lesion groupings."""
    loaded = Loaded()
    groupings_path = folder / "ISIC2018_Task3_Training_LesionGroupings.csv"
    lesions = (
        read_csv(groupings_path, ("image", "lesion_id")).set_index("image")["lesion_id"].to_dict()
        if groupings_path.exists()
        else {}
    )
    truth_files = sorted(folder.glob("ISIC2018_Task3_*_GroundTruth.csv"))
    if not truth_files:
        raise SourceError(f"{folder}: no ISIC2018_Task3_*_GroundTruth.csv")
    classes = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
    for truth_path in truth_files:
        truth = read_csv(truth_path, ("image", *classes))
        split = truth_path.name.split("_")[2]  # Training / Validation / Test
        builder = RecordBuilder("isic2018")
        refs = attach_images(
            builder, truth, "image", image_index([folder / f"ISIC2018_Task3_{split}_Input", folder / "images"]), truth_path
        )
        for i, row in enumerate(truth.to_dict("records")):
            code = _one_hot_label(builder, row, classes, truth_path, i)
            if code is not None:
                builder.add(
                    row_location(truth_path, i),
                    image_id=row["image"],
                    image_ref=refs[i],
                    lesion_id=lesions.get(row["image"]),
                    label=code,
                )
        loaded.extend(builder.loaded())
    return loaded


def read_class_folders(folder: Path) -> Loaded:
    """A class-per-folder tree such as the 9-class teaching set (`isic9/train/<class>/`).

    Folder names are mapped with the 9-class names, then with the general diagnosis
    synonyms (so `melanoma/`, `MEL/` and `nv/` all work); the folder name is kept as
    the original label.
    """
    builder = RecordBuilder("class_folders")
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir())
    if not class_dirs:
        raise SourceError(f"{folder}: no class sub-folders")
    for class_dir in class_dirs:
        code = NINE_CLASS_FOLDERS.get(class_dir.name.lower()) or harmonise.diagnosis(class_dir.name)[0]
        if code is None:
            builder.problem("bad_diagnosis", str(class_dir), f"folder name {class_dir.name!r} is not a known class", skipped=True)
            continue
        for path in sorted(class_dir.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                builder.problem("not_image", str(path), "not an image file name; ignored", skipped=True)
                continue
            builder.add(str(path), image_id=path.stem, image_ref=str(path), label=class_dir.name, diagnosis=code)
    return builder.loaded()


def read_isic_cli(folder: Path) -> Loaded:
    """An export of the ISIC Archive's official `isic image download` command:
    metadata.csv (isic_id, age_approx, anatom_site_general, sex, diagnosis or
    diagnosis_1..5, lesion_id, patient_id) with the images beside it. Diagnoses map as
    :data:`~dermsight.data.harmonise.DIAGNOSIS_SYNONYMS` says; an excluded or unknown one
    skips its record with a bad_diagnosis problem."""
    csv_path = folder / "metadata.csv"
    frame = read_csv(csv_path, ("isic_id",))
    builder = RecordBuilder("isic_archive")
    refs = attach_images(builder, frame, "isic_id", image_index([folder, folder / "images"]), csv_path)
    for i, row in enumerate(frame.to_dict("records")):
        label = _archive_label(row)
        builder.add(
            row_location(csv_path, i),
            image_id=row["isic_id"],
            image_ref=refs[i],
            patient_id=row.get("patient_id"),
            lesion_id=row.get("lesion_id"),
            age=row.get("age_approx"),
            sex=row.get("sex"),
            site=row.get("anatom_site_general"),
            label=label,
            diagnosis=_archive_code(label, row),
        )
    return builder.loaded()


# Derm7pt diagnoses -> ISIC 2019 codes (the original text is kept as the record's label). Every melanoma
# depth class and the metastasis are MEL; every nevus subtype NV; seborrheic keratosis and lentigo BKL.
# "melanosis" (a flat benign hyperpigmentation) and "miscellaneous" have no ISIC 2019 class: UNK ("benign,
# other"), like ISIC 2020's benign lesions without a specific diagnosis.
DERM7PT_DIAGNOSES: dict[str, str] = {
    "basal cell carcinoma": "BCC",
    "blue nevus": "NV",
    "clark nevus": "NV",
    "combined nevus": "NV",
    "congenital nevus": "NV",
    "dermal nevus": "NV",
    "dermatofibroma": "DF",
    "lentigo": "BKL",
    "melanoma": "MEL",
    "melanoma (in situ)": "MEL",
    "melanoma (less than 0.76 mm)": "MEL",
    "melanoma (0.76 to 1.5 mm)": "MEL",
    "melanoma (more than 1.5 mm)": "MEL",
    "melanoma metastasis": "MEL",
    "melanosis": "UNK",
    "miscellaneous": "UNK",
    "recurrent nevus": "NV",
    "reed or spitz nevus": "NV",
    "seborrheic keratosis": "BKL",
    "vascular lesion": "VASC",
}
DERM7PT_COLUMNS = ("case_num", "diagnosis", "location", "sex", "clinic", "derm")


def read_derm7pt(folder: Path) -> Loaded:
    """Derm7pt (Kawahara et al. 2018): meta/meta.csv + images/. Each case is one lesion with a
    dermoscopic image (`derm`, the record's image) and a clinical close-up photo (`clinic`), which
    is not dermoscopy and never becomes a record: see :func:`derm7pt_clinical_photos`."""
    csv_path = folder / "meta" / "meta.csv"
    frame = read_csv(csv_path, DERM7PT_COLUMNS)
    builder = RecordBuilder("derm7pt")
    for i, row in enumerate(frame.to_dict("records")):
        where = row_location(csv_path, i)
        case = row["case_num"].strip()
        if not case:
            builder.problem("missing_id", where, "no case_num", skipped=True)
            continue
        text = row["diagnosis"].strip().lower()
        code = DERM7PT_DIAGNOSES.get(text)
        if code is None:
            builder.problem("bad_diagnosis", where, f"unknown Derm7pt diagnosis {row['diagnosis']!r}", skipped=True)
            continue
        image = _derm7pt_image(folder, row["derm"])
        if image is None:
            builder.problem("missing_image", where, f"dermoscopic image {row['derm']!r} not found; record kept without image")
        builder.add(
            where,
            image_id=f"derm7pt_{case}",
            image_ref=image,
            lesion_id=f"derm7pt_{case}",
            sex=row["sex"],
            site=row["location"],
            label=row["diagnosis"].strip(),
            diagnosis=code,
        )
    return builder.loaded()


def derm7pt_clinical_photos(folder: Path, split: str | None = None) -> pd.DataFrame:
    """Derm7pt's clinical (non-dermoscopic) close-up photos: image_id (the case's record id),
    clinical_ref, diagnosis; `split` "train" or "valid" keeps the cases of that published split
    (meta/<split>_indexes.csv, row positions in meta.csv). Cases whose `clinic` field points at
    the dermoscopic image (the dataset's notes say it was missing and replaced) are left out."""
    frame = read_csv(folder / "meta" / "meta.csv", DERM7PT_COLUMNS)
    if split is not None:
        positions = read_csv(folder / "meta" / f"{split}_indexes.csv", ("indexes",))["indexes"].astype(int)
        frame = frame.iloc[positions.to_numpy()]
    rows = []
    for row in frame.to_dict("records"):
        photo = _derm7pt_image(folder, row["clinic"])
        if photo is None or row["clinic"].strip().lower() == row["derm"].strip().lower():
            continue
        rows.append({
            "image_id": f"derm7pt_{row['case_num'].strip()}",
            "clinical_ref": photo,
            "diagnosis": DERM7PT_DIAGNOSES.get(row["diagnosis"].strip().lower()),
        })
    return pd.DataFrame(rows, columns=["image_id", "clinical_ref", "diagnosis"])


def _derm7pt_image(folder: Path, relative: str) -> str | None:
    relative = (relative or "").strip()
    if not relative or ".." in Path(relative).parts:
        return None
    path = folder / "images" / relative
    return str(path) if path.is_file() else None


ARCHIVE_LEVELS = ("diagnosis_1", "diagnosis_2", "diagnosis_3", "diagnosis_4", "diagnosis_5")


def _archive_label(row: dict) -> str | None:
    """The archive's diagnosis as its path of levels ("Benign:...:Nevus", the form of
    isic-metadata's DiagnosisEnum), else the old `diagnosis` field, else diagnosis_1 alone."""
    levels = [str(row[c]).strip() for c in ARCHIVE_LEVELS if str(row.get(c) or "").strip()]
    if len(levels) > 1:
        return ":".join(levels)
    return row.get("diagnosis") or (levels[0] if levels else None)


def _archive_code(label: str | None, row: dict) -> str | None:
    """The label's code; an unknown (never an excluded) label falls back on the words
    melanoma and benign. None leaves the complaint to the record builder."""
    if label is None:
        return None
    code, _ = harmonise.diagnosis(label)
    if code is None and not harmonise.excluded(label):
        if "melanoma" in label.lower():
            code = "MEL"
        elif (row.get("diagnosis_1") or row.get("benign_malignant") or "").lower() == "benign":
            code = "UNK"
    return code


def _one_hot_label(builder: RecordBuilder, row: dict, classes: tuple[str, ...], path: Path, index: int) -> str | None:
    """The one class whose column is 1; a problem (and None) for none or several."""
    try:
        hot = [c for c in classes if float(row[c] or 0) >= 0.5]
    except ValueError:
        builder.problem("bad_diagnosis", row_location(path, index), "class columns are not numbers", skipped=True)
        return None
    if len(hot) != 1:
        what = "no class" if not hot else f"several classes ({', '.join(hot)})"
        builder.problem("bad_diagnosis", row_location(path, index), f"{what} marked for {row['image']}", skipped=True)
        return None
    return {"AKIEC": "AK"}.get(hot[0], hot[0])
