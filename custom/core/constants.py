"""BraTS 2023 GLI conventions shared by every part of the project."""

from __future__ import annotations

import re

#: channel order of the network input, everywhere
MODALITIES = ("t1c", "t1n", "t2f", "t2w")

#: 0 background, 1 NCR (necrotic core), 2 ED (peritumoral edema), 3 ET (enhancing tumour)
LABEL_VALUES = (0, 1, 2, 3)

LABEL_NAMES = {0: "background", 1: "NCR", 2: "ED", 3: "ET"}

#: nested evaluation regions and the labels each contains
REGIONS = ("WT", "TC", "ET")

REGION_LABELS = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}

#: nnU-Net regions_class_order: label written when the matching region (WT, TC, ET) is predicted
REGIONS_CLASS_ORDER = (2, 1, 3)

#: BraTS 2023 case folder names, e.g. BraTS-GLI-00000-000
CASE_ID_PATTERN = re.compile(r"^BraTS-[A-Za-z]+-\d{5}-\d{3}$")

SEG_SUFFIX = "seg"

NUM_REGIONS = len(REGIONS)
