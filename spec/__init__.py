"""What kiln is told, and the helpers every layer shares: the recipe model (spec/recipe.py), this host's settings
(spec/settings.py) and file digests (spec/digests.py). The leaf of the house: it imports nothing of kiln."""
