"""Developer tools that are neither ops nor tests: e.g. `python -m dsv4.tools.compile_check`."""
