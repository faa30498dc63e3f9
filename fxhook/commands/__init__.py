"""Commands of the `fxhook` program that live in their own modules (listed in fxhook/cli.py)."""
