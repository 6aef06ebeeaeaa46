"""`python -m relay` is `mj-relay`."""

from relay.cli import main

main(prog_name="mj-relay")
