"""The `zerotrain` command line (placeholder until the pipeline lands)."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("zerotrain: the training pipeline is not built yet", file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
