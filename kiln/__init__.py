"""kiln: bake VM images from recipes kept in git, and remember how every image was made."""

from core.settings import KILN_VERSION as __version__

__all__ = ["__version__"]
