"""`python -m fxhook`: the fxhook command."""
from fxhook.cli import main

raise SystemExit(main())
