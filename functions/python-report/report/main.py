from .render import render


def handler(params, context):
    rows = params["rows"]
    total = sum(row["value"] for row in rows)
    return {"html": render("report.html", title=params["title"], rows=rows, total=total), "total": total}
