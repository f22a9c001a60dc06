"""`python -m tsfast.gpucheck`: the whole GPU story in one command (see __main__.py)."""
