"""How the infer tasks write their result file."""

from __future__ import annotations


def write_intact(writer, data):
    """Call MONAI Label's ``writer(data, extension, dtype)`` so that the result is written as it is.

    No ``result_dtype`` (labels stay uint8, the uncertainty map stays float32) and always ``.nii.gz``: the
    request cannot choose the file type or the temporary file's name ending.
    """
    data["result_extension"] = ".nii.gz"
    data.pop("result_dtype", None)
    data.pop("result_compress", None)
    return writer(data, extension=None, dtype=None)
