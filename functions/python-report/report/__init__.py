"""An HTML report rendered with Jinja2 from a template beside the code."""
