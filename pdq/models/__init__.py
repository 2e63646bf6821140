from pdq.models import paper  # noqa: F401  (registers the paper zoo: resnet18_brecq, regnetx_600m, ...)
from pdq.models.registry import build_custom, build_model, check_model_name, known_models, register_model

__all__ = ["build_custom", "build_model", "check_model_name", "known_models", "register_model"]
