"""The image graph as recursive SQL: ancestors (up the parent chain) and descendants (down it), one query each.

Both are SQLAlchemy common table expressions of (id, parent_id, depth) that lineage.py joins for its reads and
store.py uses for revocation; they run the same on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import CTE, Integer, literal, select

from provenance.models import Image

# A parent chain is acyclic by construction; the bound only keeps a corrupted row from looping forever.
MAX_DEPTH = 10_000


def ancestors_cte(image_row_id: int, name: str = "ancestors") -> CTE:
    """The image itself (depth 0), its parent (1), the parent's parent (2), … up to the root."""
    start = select(
        Image.id.label("id"), Image.parent_id.label("parent_id"), literal(0, Integer).label("depth")
    ).where(Image.id == image_row_id)
    chain = start.cte(name, recursive=True)
    step = select(Image.id, Image.parent_id, (chain.c.depth + 1).label("depth")).join(
        chain, Image.id == chain.c.parent_id
    ).where(chain.c.depth < MAX_DEPTH)
    return chain.union_all(step)


def descendants_cte(roots: int | Iterable[int], name: str = "descendants") -> CTE:
    """The image(s) themselves (depth 0), their children (1), their children's children (2), … to the leaves."""
    ids = [roots] if isinstance(roots, int) else list(roots)
    start = select(
        Image.id.label("id"), Image.parent_id.label("parent_id"), literal(0, Integer).label("depth")
    ).where(Image.id.in_(ids) if len(ids) > 1 else Image.id == ids[0])
    tree = start.cte(name, recursive=True)
    step = select(Image.id, Image.parent_id, (tree.c.depth + 1).label("depth")).join(
        tree, Image.parent_id == tree.c.id
    ).where(tree.c.depth < MAX_DEPTH)
    return tree.union_all(step)
