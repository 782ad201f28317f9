"""Label names and values the app shows: names 3D Slicer's MONAI Label module gives colours to.

Slicer's MONAI Label module colours a segment by looking its name up (lower case) in its copy of Slicer's
``GenericAnatomyColors`` table (``MONAILabelLib/labelcolors.py``); a name it does not find gets an automatic
colour. The table has ``necrosis`` and ``edema``; it has no entry for enhancing tumour (nor any tumour
sub-region) and none for an uncertain region, so those two segments get automatic colours.
"""

from __future__ import annotations

from custom.core.constants import LABEL_NAMES, LABEL_VALUES

#: BraTS label name (``custom.core.constants.LABEL_NAMES``) -> the name the app gives it
DISPLAY_NAMES = {"NCR": "necrosis", "ED": "edema", "ET": "enhancing tumor"}
#: the names with a colour in Slicer's MONAI Label module (the others get an automatic colour)
SLICER_COLOURED = ("necrosis", "edema")

#: label name -> value of the ``segmentation`` label map: necrosis 1, edema 2, enhancing tumor 3
TUMOUR_LABELS = {DISPLAY_NAMES[LABEL_NAMES[v]]: v for v in LABEL_VALUES if v}

#: the region an annotator should decide (error probability at or above the threshold)
UNCERTAIN_NAME = "uncertain"
UNCERTAIN_VALUE = max(LABEL_VALUES) + 1

#: label name -> value of the ``uncertainty`` label map (and of the app: Slicer makes these segments)
REVIEW_LABELS = {**TUMOUR_LABELS, UNCERTAIN_NAME: UNCERTAIN_VALUE}
