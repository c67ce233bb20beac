"""``python -m prunekit`` (and ``torchrun ... -m prunekit``): the command line."""

from prunekit.cli import main

if __name__ == "__main__":
    main()
