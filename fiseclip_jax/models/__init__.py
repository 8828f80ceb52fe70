"""Vision towers as objects (`tower.Tower`), the shared ViT pieces, and the table that builds a
tower from its architecture config (`registry`). Nothing here is specific to FiSeCLIP."""
