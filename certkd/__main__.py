"""``python -m certkd``: the same command line as the ``certkd`` console script."""

from certkd.cli import main

if __name__ == "__main__":
    main()
