"""The lineage deployment: where an image comes from and what came of it, as a markdown artifact in the Prefect UI
(the same ancestors, children and siblings as `kiln lineage`, from provenance/lineage.py's queries)."""

from __future__ import annotations

import re

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from operations.artifacts import lineage_markdown
from provenance import lineage


@flow(name="lineage")
def image_lineage(image_id: str) -> dict:
    """Ancestors, children, descendants and siblings of an image kiln knows, as a markdown artifact.

    Args:
        image_id: Any image id kiln knows: an AMI, a Glance id, a local img-…, or a disk file's sha256
            (`kiln images` lists them). An unknown id fails the run, saying so.
    """
    found = lineage.lineage(image_id.strip())
    create_markdown_artifact(
        key="kiln-lineage-" + (re.sub(r"[^a-z0-9-]+", "-", found.subject.image.image_id.lower()).strip("-")[:60]
                               or "image"),
        markdown=lineage_markdown(found),
        description=f"kiln lineage {image_id}",
    )
    return found.to_dict()
