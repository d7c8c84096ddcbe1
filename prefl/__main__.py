"""``python -m prefl``: the same as the ``prefl`` command."""

from prefl.cli import main

if __name__ == "__main__":
    main()
