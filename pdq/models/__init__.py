from pdq.models.registry import build_model, check_model_name, known_models, register_model

__all__ = ["build_model", "check_model_name", "known_models", "register_model"]
