"""The image graph as recursive SQL: ancestors (up the parent chain) and descendants (down it), one query each.

Both are SQLAlchemy common table expressions of (id, parent_id, depth) that lineage.py joins for its reads and
store.py uses for revocation; they run the same on SQLite and PostgreSQL. The starting image is a bound
parameter (ROOT, or ROOTS for several), so a statement is built once and reused with its compiled form cached.
"""

from __future__ import annotations

from sqlalchemy import CTE, Integer, bindparam, literal, select

from provenance.models import Image

# A parent chain is acyclic by construction; the bound only keeps a corrupted row from looping forever.
MAX_DEPTH = 10_000
ROOT = "root_id"  # parameter name: the image row the walk starts from
ROOTS = "root_ids"  # parameter name: several image rows to start from (descendants_cte(several=True))


def ancestors_cte(name: str = "ancestors") -> CTE:
    """The image itself (depth 0), its parent (1), the parent's parent (2), … up to the root."""
    start = select(
        Image.id.label("id"), Image.parent_id.label("parent_id"), literal(0, Integer).label("depth")
    ).where(Image.id == bindparam(ROOT, type_=Integer))
    chain = start.cte(name, recursive=True)
    step = select(Image.id, Image.parent_id, (chain.c.depth + 1).label("depth")).join(
        chain, Image.id == chain.c.parent_id
    ).where(chain.c.depth < MAX_DEPTH)
    return chain.union_all(step)


def descendants_cte(name: str = "descendants", *, several: bool = False) -> CTE:
    """The image(s) themselves (depth 0), their children (1), their children's children (2), … to the leaves."""
    root = Image.id.in_(bindparam(ROOTS, expanding=True)) if several else Image.id == bindparam(ROOT, type_=Integer)
    start = select(Image.id.label("id"), Image.parent_id.label("parent_id"), literal(0, Integer).label("depth")).where(
        root
    )
    tree = start.cte(name, recursive=True)
    step = select(Image.id, Image.parent_id, (tree.c.depth + 1).label("depth")).join(
        tree, Image.parent_id == tree.c.id
    ).where(tree.c.depth < MAX_DEPTH)
    return tree.union_all(step)
