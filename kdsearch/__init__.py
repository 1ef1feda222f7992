"""kdsearch: knowledge distillation with Integrated Gradients overlays, searched and ablated with Optuna and MLflow."""
