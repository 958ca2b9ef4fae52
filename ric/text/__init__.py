"""Text modality: Hugging Face causal-LM policy, text reward models and text datasets."""
