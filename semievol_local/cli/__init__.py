"""The `semievol` command line: thin wrappers that parse, call the library, and hand results to `ui`.

One module per command group (`models`, `predict`, `train`, `bench`, `run`, `serve`); what they share is
in `common`, and all terminal drawing (progress, tables, messages) in `ui`. Every command turns a
`UserError` into one line on stderr and exit code 2 (no traceback). Options that configure the library
come from the dataclasses in `core.config`, declared once. This package imports every other one (`core`,
`engines`, `training`, `method`, `bench`); none of them imports it.
"""
from __future__ import annotations

import logging

from . import ui
from . import bench, models, predict, run, serve, train  # noqa: F401  (each registers its commands)
from .common import app, invocation  # noqa: F401


def main() -> None:
    logging.basicConfig(level=logging.WARNING, handlers=[ui.LogLines()])
    logging.getLogger("semievol_local").setLevel(logging.INFO)  # its notes too: slow one-time work, resumes
    app()
