from pathlib import Path

import jinja2

# The templates folder sits beside the package, in the function's own files.
_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).resolve().parent.parent / "templates"),
    autoescape=True,
    keep_trailing_newline=True,
)


def render(name, **values):
    return _ENV.get_template(name).render(**values)
