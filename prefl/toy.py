"""``python -m prefl.toy``: the main job under its first name, an alias of :mod:`prefl.pipeline`
(kept so that existing commands and scripts go on working)."""

from prefl.pipeline import main

if __name__ == "__main__":
    main()
