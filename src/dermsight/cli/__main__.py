"""`python -m dermsight.cli`: the `dermsight` command."""

from dermsight.cli import main

main()
