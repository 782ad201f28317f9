"""The studies folder as MONAI Label's local datastore, with every id checked before it reaches the disk.

MONAI Label's ``LocalDatastore`` joins request values into paths (``<studies>/<image id><ext>``,
``<studies>/labels/<tag>/<image id><ext>``): an id like ``../repo/custom/__init__`` with an uploaded ``.py``
file would write outside the folder, and ``DELETE`` with such an id would delete there. ``StudyDatastore``
checks every image/label id and tag (``custom.data.studies.check_study_id``: a plain name) on every method
that takes one, accepts only NIfTI files, and checks uploads: an image must be a 4-channel study, a label a
BraTS label map of the study's shape (values 0..3; the ``uncertain`` value of the ``uncertainty`` infer
task is refused with what to do about it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict

from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.exception import ImageNotFoundException

from custom.core.errors import BraTSInputError
from custom.data.studies import (
    STUDY_SUFFIXES,
    check_study_header,
    check_study_id,
    load_study_label,
    study_id_of,
    study_suffix,
)
from lib.labels import TUMOUR_LABELS, UNCERTAIN_NAME, UNCERTAIN_VALUE

logger = logging.getLogger(__name__)


def _check_nifti(path, what: str) -> str:
    suffix = study_suffix(str(path))
    if suffix is None:
        raise BraTSInputError([f"{what} {Path(path).name!r} is not a NIfTI file (accepted: {', '.join(STUDY_SUFFIXES)})"],
                              "invalid upload")
    return suffix


class StudyDatastore(LocalDatastore):
    """``LocalDatastore`` over the studies folder (NIfTI only) that refuses ids and tags which are not plain names.

    Raises ``custom.data.studies.StudyIdError`` for a bad id or tag, ``BraTSInputError`` for a bad upload and
    MONAI Label's ``ImageNotFoundException`` for a label of an unknown image.
    """

    def __init__(self, datastore_path: str, auto_reload: bool = False, read_only: bool = False):
        super().__init__(datastore_path, extensions=tuple(f"*{s}" for s in STUDY_SUFFIXES),
                         auto_reload=auto_reload, read_only=read_only)

    # ------------------------------------------------------------------------------------------ images
    def get_image(self, image_id: str, params=None) -> Any:
        return super().get_image(check_study_id(image_id), params)

    def get_image_uri(self, image_id: str) -> str:
        return super().get_image_uri(check_study_id(image_id))

    def get_image_info(self, image_id: str) -> Dict[str, Any]:
        return super().get_image_info(check_study_id(image_id))

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        return super().update_image_info(check_study_id(image_id), info)

    def get_labels_by_image_id(self, image_id: str) -> Dict[str, str]:
        return super().get_labels_by_image_id(check_study_id(image_id))

    def get_label_by_image_id(self, image_id: str, tag: str) -> str:
        return super().get_label_by_image_id(check_study_id(image_id), check_study_id(tag, "label tag"))

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        """Add an uploaded study; its id is ``image_id`` or else the uploaded file's name without extension."""
        image_id = check_study_id(image_id or study_id_of(image_filename))
        _check_nifti(image_filename, "uploaded image")
        check_study_header(image_filename)
        return super().add_image(image_id, image_filename, image_info)

    def remove_image(self, image_id: str) -> None:
        return super().remove_image(check_study_id(image_id))

    # ------------------------------------------------------------------------------------------ labels
    def get_label(self, label_id: str, label_tag: str, params=None) -> Any:
        return super().get_label(check_study_id(label_id, "label id"), check_study_id(label_tag, "label tag"), params)

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        return super().get_label_uri(check_study_id(label_id, "label id"), check_study_id(label_tag, "label tag"))

    def get_label_info(self, label_id: str, label_tag: str) -> Dict[str, Any]:
        return super().get_label_info(check_study_id(label_id, "label id"), check_study_id(label_tag, "label tag"))

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        return super().update_label_info(check_study_id(label_id, "label id"), check_study_id(label_tag, "label tag"),
                                         info)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        return super().remove_label(check_study_id(label_id, "label id"), check_study_id(label_tag, "label tag"))

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        """Save an uploaded label of a study: NIfTI, the study's spatial shape, BraTS values only."""
        check_study_id(image_id)
        check_study_id(label_tag, "label tag")
        _check_nifti(label_filename, "uploaded label")
        image_uri = super().get_image_uri(image_id)
        if not image_uri:
            raise ImageNotFoundException(f"Image {image_id} not found")
        shape = check_study_header(image_uri)
        try:
            load_study_label(label_filename, shape)
        except BraTSInputError as exc:
            problems = [p.replace(str(label_filename), f"label of {image_id}") for p in exc.problems]
            if any(f"{UNCERTAIN_VALUE:g} (" in p for p in problems):
                names = ", ".join(TUMOUR_LABELS)
                problems.append(
                    f"value {UNCERTAIN_VALUE} is the '{UNCERTAIN_NAME}' segment of the 'uncertainty' infer task: "
                    f"decide those voxels ({names} or background) or delete the '{UNCERTAIN_NAME}' segment, "
                    f"then submit the label again")
            raise BraTSInputError(problems, "label not saved") from None
        return super().save_label(image_id, label_filename, label_tag, label_info)
