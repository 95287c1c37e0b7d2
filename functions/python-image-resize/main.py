"""Resizes an image file (by reference) with Pillow; writes the result as a new file.

params: {"file_id", "width"?, "height"?, "fit"?: "contain" | "cover" | "fill", "format"?: "jpeg" | "png" | "webp"}
result: {"file_id", "width", "height", "format", "size", "download_url"}
"""

import io

import fnrt
from PIL import Image, ImageOps, UnidentifiedImageError


class InvalidParams(ValueError):
    code = "INVALID_PARAMS"


FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


def handler(params, context):
    data = fnrt.files.read(params["file_id"])
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise InvalidParams(f"the file is not an image Pillow reads: {exc}") from None
    image = ImageOps.exif_transpose(image)
    width, height = params.get("width"), params.get("height")
    if width is None and height is None:
        # Neither: the original size (a re-encode, e.g. to another format).
        width, height = image.width, image.height
    # One side given: the other keeps the aspect ratio.
    width = width or max(1, round(image.width * height / image.height))
    height = height or max(1, round(image.height * width / image.width))
    fit = params.get("fit", "contain")
    if fit == "fill":
        resized = image.resize((width, height), Image.Resampling.LANCZOS)
    elif fit == "cover":
        resized = ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS)
    else:
        resized = ImageOps.contain(image, (width, height), Image.Resampling.LANCZOS)
    fmt = params.get("format") or ("png" if image.format == "PNG" else "jpeg")
    if fmt == "jpeg" and resized.mode not in ("RGB", "L"):
        resized = resized.convert("RGB")
    out = io.BytesIO()
    resized.save(out, FORMATS[fmt], quality=90) if fmt != "png" else resized.save(out, "PNG")
    written = fnrt.files.write(out.getvalue(), name=f"resized.{'jpg' if fmt == 'jpeg' else fmt}")
    return {
        "file_id": written["file_id"],
        "width": resized.width,
        "height": resized.height,
        "format": fmt,
        "size": written["size"],
        "download_url": written["download_url"],
    }
