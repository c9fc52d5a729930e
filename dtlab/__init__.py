"""dtlab: the machinery around the labs (core, collectives, tools, exercises, the CLI).

The labs themselves live in the ``labs`` package, one file each; see docs/architecture.md for
what each part may import.
"""
