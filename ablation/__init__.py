"""ablation: layer-wise interventions in adversarial training, one shared trainer."""
