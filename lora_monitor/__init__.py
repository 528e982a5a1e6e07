"""lora-monitor: follow kohya sd-scripts LoRA training and score every saved checkpoint against the references."""

__version__ = "0.1.0"
