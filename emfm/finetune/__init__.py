"""Fine-tuning pretrained encoders for segmentation: losses and instance post-processing."""
