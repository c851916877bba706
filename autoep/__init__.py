"""AutoEP: automatic expert parallelism for Hugging Face Mixture-of-Experts models."""

from autoep.api import apply, inspect, replaced_layers
from autoep.config import AutoEPConfig, AutoEPConfigError
from autoep.detect import DetectionError, MoELayerSpec
from autoep.engine import initialize
from autoep.export import save_pretrained
from autoep.gradients import reduce_gradients
from autoep.layer import AutoEPMoELayer
from autoep.routing import RoutingSpec
from autoep.universal import to_universal
from autoep.versions import UnsupportedTransformersError

__all__ = [
    "apply", "inspect", "replaced_layers", "AutoEPConfig", "AutoEPConfigError", "DetectionError",
    "MoELayerSpec", "AutoEPMoELayer", "RoutingSpec", "UnsupportedTransformersError", "reduce_gradients",
    "initialize", "save_pretrained", "to_universal",
]
