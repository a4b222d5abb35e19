"""`python -m onnxgrad`: the command line (see onnxgrad.cli)."""

from __future__ import annotations

from onnxgrad.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
