"""What every test shares."""

import os

# The suite starts a few thousand Python processes (ranks, node agents, daemons, CLI
# runs). Where the environment sets PYTHONDONTWRITEBYTECODE, each of them compiled every
# module of this checkout again on start (about 0.1 s of CPU a process on a 2-core
# machine). The processes the tests start may cache bytecode (__pycache__ is ignored by
# git); the product itself leaves the variable to the user.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
