"""``python -m fmcache``: the ``fmcache`` command."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="fmcache")
