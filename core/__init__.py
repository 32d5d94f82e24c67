"""What kiln is told, and the helpers every layer shares: the recipe model (core/recipe.py), this host's settings
(core/settings.py) and file digests (core/digests.py). The leaf of the house: it imports nothing of kiln."""
