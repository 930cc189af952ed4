"""`python -m eimctl` runs the command-line tool, like the `eimctl` script."""
from eimctl.cli import main

main()
