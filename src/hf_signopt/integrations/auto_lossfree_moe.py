"""Registers the `lossfree_moe` model type with transformers: Auto classes and checkpoint key conversion.

After registration `AutoConfig`, `AutoModel`, `AutoModelForCausalLM` and the task-head Auto classes resolve
`model_type="lossfree_moe"` without `trust_remote_code`, and `lossfree_moe` checkpoints use Mixtral's key
conversion (transformers saves Mixtral experts under their Hub names `block_sparse_moe.experts.N.w1/w2/w3` and
merges them into `mlp.experts.gate_up_proj/down_proj` on load), so a Mixtral checkpoint loads into our model.
`Trainer` reloads checkpoints with a plain `load_state_dict`, which skips this mapping; `LossFreeMoeDecoderLayer`
converts the same Hub names there itself.

The config and model classes are also set as attributes of the `transformers` module, as its own are: tools
that resolve `config.architectures[0]` with `getattr(transformers, name)` (TRL's `SFTTrainer(model="<dir>")` and
its CLI) find them instead of taking the checkpoint for remote code.
"""

import transformers

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

from ..moe.configuration_lossfree_moe import LossFreeMoeConfig
from ..moe.modeling_lossfree_moe import (
    LossFreeMoeForCausalLM,
    LossFreeMoeForQuestionAnswering,
    LossFreeMoeForSequenceClassification,
    LossFreeMoeForTokenClassification,
    LossFreeMoeModel,
)

_AUTO_MODEL_CLASSES = (
    (AutoModel, LossFreeMoeModel),
    (AutoModelForCausalLM, LossFreeMoeForCausalLM),
    (AutoModelForSequenceClassification, LossFreeMoeForSequenceClassification),
    (AutoModelForTokenClassification, LossFreeMoeForTokenClassification),
    (AutoModelForQuestionAnswering, LossFreeMoeForQuestionAnswering),
)


def register_lossfree_moe() -> None:
    """Makes the Auto classes resolve `model_type="lossfree_moe"` and gives it Mixtral's checkpoint key conversion.

    Called by `import hf_signopt`. Idempotent: calling it again re-registers the same classes and mapping.
    """
    register_checkpoint_conversion_mapping(
        LossFreeMoeConfig.model_type, get_checkpoint_conversion_mapping("mixtral"), overwrite=True
    )
    AutoConfig.register(LossFreeMoeConfig.model_type, LossFreeMoeConfig, exist_ok=True)
    setattr(transformers, LossFreeMoeConfig.__name__, LossFreeMoeConfig)
    for auto_class, model_class in _AUTO_MODEL_CLASSES:
        auto_class.register(LossFreeMoeConfig, model_class, exist_ok=True)
        setattr(transformers, model_class.__name__, model_class)


__all__ = ["register_lossfree_moe"]
