"""Tools on models and finished runs: export, DTP-ViT boundaries, LR range test, profile, FLOPs."""
