"""The 14 CheXpert observations and pure label handling (no pixels).

Everything here works on label values only, so it is testable without images.
Label meaning is always by name, never by column position.
"""

from __future__ import annotations

# CheXpert's column order in train.csv / valid.csv.
OBSERVATIONS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

# Label values as they appear in CheXpert CSVs. A blank cell is NaN.
POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0
