"""`python -m agent.simulate ...` is `agent simulate ...`."""

from agent.simulate.cli import main

raise SystemExit(main())
