"""Draws detections' boxes and labels on an image file (by reference) with Pillow.

params: {"file_id", "detections": [{"label"?, "score"?, "box": {"x", "y", "width", "height"}}],
         "color"?: "#rrggbb", "format"?: "jpeg" | "png"}
result: {"file_id", "width", "height", "format", "size", "boxes", "download_url"}
"""

import io

import fnrt
from PIL import Image, ImageDraw, UnidentifiedImageError


class InvalidParams(ValueError):
    code = "INVALID_PARAMS"


def handler(params, context):
    try:
        image = Image.open(io.BytesIO(fnrt.files.read(params["file_id"])))
        image = image.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise InvalidParams(f"the file is not an image Pillow reads: {exc}") from None
    color = params.get("color", "#ff3b30")
    draw = ImageDraw.Draw(image)
    line = max(2, round(min(image.size) / 150))
    for d in params["detections"]:
        b = d["box"]
        x0, y0, x1, y1 = b["x"], b["y"], b["x"] + b["width"], b["y"] + b["height"]
        draw.rectangle((x0, y0, x1, y1), outline=color, width=line)
        text = d.get("label", "")
        if "score" in d:
            text = f"{text} {d['score']:.1f}".strip()
        if text:
            left, top, right, bottom = draw.textbbox((x0, y0), text)
            lift = bottom - top + 2 * line
            ty = y0 - lift if y0 >= lift else y1
            draw.rectangle((x0, ty, x0 + right - left + 2 * line, ty + lift), fill=color)
            draw.text((x0 + line, ty + line), text, fill="white")
    fmt = params.get("format", "jpeg")
    out = io.BytesIO()
    image.save(out, "PNG" if fmt == "png" else "JPEG", quality=90)
    written = fnrt.files.write(out.getvalue(), name=f"annotated.{'png' if fmt == 'png' else 'jpg'}")
    return {
        "file_id": written["file_id"],
        "width": image.width,
        "height": image.height,
        "format": fmt,
        "size": written["size"],
        "boxes": len(params["detections"]),
        "download_url": written["download_url"],
    }
