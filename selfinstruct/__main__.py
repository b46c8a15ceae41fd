"""`python -m selfinstruct` runs the CLI."""

from selfinstruct.cli import main

main()
