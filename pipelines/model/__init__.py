"""The model core: flat parameter buffers, layers, models, losses.

Build a model by name from plain config, compute a loss and its gradient, leave the
update to an optimizer working on a flat shard::

    from pipelines.model import build_model

    model = build_model("char_transformer", vocab=96, d_model=128, n_layer=2, seed=0)
    loss, grads = model.compute_gradients({"x": x, "y": y}, seed=step)
    # model.params and grads share one layout (model.layout); shard k is a slice
    metrics_input = model.evaluate(eval_batch)        # {"loss": ..., "logits": ...}

Models (build_model names; each class docstring lists its config, batch keys, outputs
and parameter names): mlp_classifier, mlp_regressor, triplet_embedder, char_transformer.
Losses by name or weighted sums: see pipelines.model.losses. Gradient checks for new
layers: pipelines.model.testing. A model from the user's file ("PATH.py:NAME"):
build_file_model (see _file).

Public names live here and only here (tests/pipelines/model/test_api.py checks it);
the implementation is in the private modules `_module`, `_layers`, `_model`, `_models`,
plus the public `losses` (the loss registry), `testing` (gradient checks) and `bench`
(the training-step benchmark against torch).
"""

from pipelines.model._file import (
    ModelFileError,
    build_file_model,
    load_model_object,
    parse_model_spec,
)
from pipelines.model._kernels import BACKENDS
from pipelines.model._layers import (
    MLP,
    Activation,
    Block,
    CausalSelfAttention,
    Dropout,
    Embedding,
    L2Normalize,
    LayerNorm,
    Linear,
    LoRALinear,
    RMSNorm,
    SwiGLUMLP,
)
from pipelines.model._model import Model, ParamSlot
from pipelines.model._models import (
    MODELS,
    CharTransformer,
    MLPClassifier,
    MLPRegressor,
    TripletEmbedder,
    build_model,
    model_names,
    register_model,
)
from pipelines.model._module import GradTracker, Module, ModuleList, Parameter, Pass
from pipelines.model.losses import LOSSES, Loss, loss_names, register_loss, resolve_loss

__all__ = [
    "BACKENDS",
    "LOSSES",
    "MODELS",
    "Activation",
    "Block",
    "CausalSelfAttention",
    "CharTransformer",
    "Dropout",
    "Embedding",
    "GradTracker",
    "L2Normalize",
    "LayerNorm",
    "Linear",
    "LoRALinear",
    "Loss",
    "MLP",
    "MLPClassifier",
    "MLPRegressor",
    "Model",
    "Module",
    "ModuleList",
    "ModelFileError",
    "ParamSlot",
    "Parameter",
    "Pass",
    "RMSNorm",
    "SwiGLUMLP",
    "TripletEmbedder",
    "build_file_model",
    "build_model",
    "load_model_object",
    "loss_names",
    "model_names",
    "parse_model_spec",
    "register_loss",
    "register_model",
    "resolve_loss",
]
