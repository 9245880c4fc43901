"""`python -m semievol_local.cli`: the `semievol` command."""
from . import main

main()
