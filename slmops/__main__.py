"""`python -m slmops` is the `slmops` command."""

from slmops.cli import main

main()
