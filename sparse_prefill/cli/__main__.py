"""`python -m sparse_prefill.cli`: the `sparse-prefill` command."""

from sparse_prefill.cli import main

raise SystemExit(main())
