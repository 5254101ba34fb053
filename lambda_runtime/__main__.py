"""`python -m lambda_runtime serve ...`."""

from __future__ import annotations

from lambda_runtime.cli import main

raise SystemExit(main())
