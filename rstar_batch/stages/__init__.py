"""One module per stage of the plan: normalize → tokenize → score → rank.

Each stage reads and writes a fixed set of columns (named in `columns.py`) and
depends only on the config and its input columns.
"""
