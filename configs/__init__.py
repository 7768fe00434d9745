"""Hydra configs, shipped inside the package as emfm.configs (emfm/configs links here)."""
