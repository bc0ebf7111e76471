"""`python -m agent ...` is the `agent` console script."""

from agent.cli import main

raise SystemExit(main())
