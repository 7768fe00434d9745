#!/usr/bin/env bash
# The README's demo: synthetic EM -> TIFF -> OME-Zarr -> MAE pretraining of a small ViT on CPU.
# Reuses demo/synth.tif and demo/synth.zarr when they exist.
set -euo pipefail
mkdir -p demo
[ -e demo/synth.tif ] || emfm synth --out demo/synth.tif --shape 48 256 256 --anisotropy 5
[ -e demo/synth.zarr ] || emfm ingest demo/synth.tif --out demo/synth.zarr
emfm pretrain experiment=demo "$@"
