"""Training: execution planning, end-to-end fine-tuning and its checkpoint keeper, frozen
feature extraction and heads (the method's two approaches)."""
